#!/usr/bin/env bash
# Build infra/dvc-plots.html: DVC's plot page with vega, vega-lite and vega-embed inlined, so
# `dvc plots show` renders offline (DVC's own page loads them from a CDN: blank without internet).
# Needs npm and the npm registry once; the result is committed. Libraries: BSD-3-Clause (vega).
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
versions=(vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0)
(cd "$tmp" && npm pack --silent "${versions[@]}" >/dev/null && for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done)
{
  printf '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>tripletflow plots</title>\n'
  printf '    <!-- %s, inlined by infra/make_dvc_plots_template.sh (BSD-3-Clause) -->\n' "${versions[*]}"
  for js in vega-5.33.1/package/build/vega.min.js vega-lite-5.23.0/package/build/vega-lite.min.js \
            vega-embed-6.29.0/package/build/vega-embed.min.js; do
    printf '    <script type="text/javascript">\n'
    cat "$tmp/$js"
    printf '\n    </script>\n'
  done
  printf '    <style>\n        table { border-spacing: 15px; }\n    </style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n'
} > dvc-plots.html
echo "wrote $(pwd)/dvc-plots.html ($(wc -c < dvc-plots.html) bytes)"
