#!/usr/bin/env bash
# Before a GPU call (at no device time): what benchmarks/gpu_session.sh expects in the repo root,
# then a check that the session's code imports with only what that machine will have.
#   .whl/      py3.12 manylinux wheels of the packages the device image lacks, at this
#              environment's versions (the image has torch, numpy, pyarrow, numba, matplotlib...)
#   .devdata/  the Omniglot zips
# Both go into .git/info/exclude (the device copies untracked files git does not ignore; these
# travel only when named in `carry`). The check runs, on this CPU, with benchmarks/image_only.py
# as sitecustomize (an import outside the image and the wheels fails as it would there): the
# CUDA test files' collection, the objective benchmark, and the six stages of the default
# pipeline in a temporary clone (MLflow store included). ~2 minutes on 2 cores.
#
#   bash benchmarks/gpu_prepare.sh [--no-check]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OMNIGLOT=${OMNIGLOT:-$ROOT/../shared/datasets/omniglot}
# The packages the image lacks (DEVELOPERS.md: GPU figures): our direct needs and what they import.
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions
pytorch-metric-learning faiss-cpu mlflow-skinny sqlalchemy alembic mako greenlet cachetools databricks-sdk
fastapi starlette uvicorn annotated-doc gitpython gitdb smmap importlib-metadata opentelemetry-api
opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions python-dotenv sqlparse
cryptography cffi pycparser"

mkdir -p .git/info
for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
mkdir -p .whl .devdata
for name in $PACKAGES; do
  version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
  wheel_prefix=$(echo "$name" | tr '-' '_')
  if ls .whl | grep -qi "^${wheel_prefix}-${version}-"; then continue; fi
  rm -f .whl/"${wheel_prefix}"-*.whl  # one version of each: two stop the whole install there
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    -d .whl "$name==$version" 2>&1 | { grep -v "is ignored: it is neither" || true; }
done
cp -u "$OMNIGLOT"/images_background.zip "$OMNIGLOT"/images_evaluation.zip "$OMNIGLOT"/all_runs.zip .devdata/
echo "gpu_prepare: .whl $(du -sm .whl | cut -f1) MB ($(ls .whl | wc -l) wheels), .devdata $(du -sm .devdata | cut -f1) MB (carry limit 64 MiB)"

[ "${1:-}" = "--no-check" ] && exit 0
CHECK=$(mktemp -d)
trap 'rm -rf "$CHECK"' EXIT
mkdir "$CHECK/site"
cp benchmarks/image_only.py "$CHECK/site/sitecustomize.py"
export PYTHONPATH="$CHECK/site:$ROOT" IMAGE_ONLY_WHEELS="$ROOT/.whl" TQDM_DISABLE=1
"$PY" -c 'import yaml, torch; import sitecustomize
try:
    import prefect
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("gpu_prepare: the image-only guard is not active")'
# check NAME CMD...: run CMD, its output to a log; on failure show the log's end and stop.
check() {
  local name=$1
  shift
  "$@" >"$CHECK/$name.log" 2>&1 || { tail -20 "$CHECK/$name.log"; echo "gpu_prepare: $name fails with only the image + .whl"; exit 1; }
}
# Without this environment's pytest plugins (hydra's imports omegaconf): the image has its own.
check collect env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -q -p no:cacheprovider --collect-only \
  tests/test_search.py tests/test_objectives.py tests/test_triplet_kernel.py tests/test_train.py tests/test_resume.py
check objective_speed "$PY" benchmarks/objective_speed.py --device cpu --batches 64 --budget 0.2
git clone -q "$ROOT" "$CHECK/repo"
cd "$CHECK/repo"  # python -m: the clone's code first
for stage in ingest make_batches train export_embeddings build_index evaluate; do
  check "$stage" "$PY" -m "tasks.$stage"
done
echo "gpu_prepare: imports ok (pytest collection, objective_speed, six stages with only the image + .whl)"
