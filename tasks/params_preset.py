"""Params presets: a YAML file of the ``section.key`` values that differ from params.yaml.

A preset (``params/omniglot.yaml``) has params.yaml's shape but only the keys it changes; each
``section: {key: value}`` it gives *replaces* that key's value in params.yaml (a whole
``train.loss`` mapping, not a merge into the default's kwargs), so params.yaml stays the one
source of every other default. ``extends: omniglot.yaml`` builds a preset on another one. The same preset reaches both runners:

- the Prefect flow: ``python -m flows.pipeline --preset params/omniglot.yaml`` (``--preset``
  again adds another, e.g. a loss + miner preset of ``params/mining/``; dotted ``--set``
  overrides then apply on top; :func:`with_preset`);
- DVC: ``python -m tasks.params_preset params/omniglot.yaml [-- dvc exp run args]`` runs
  ``dvc exp run`` with one ``--set-param`` per key, so the experiment's params.yaml — what DVC
  versions and ``dvc exp show`` lists — holds the preset's values.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.errors import ParamsError
from tasks.params import load_params, read_yaml


def read_preset(path: str | Path, _chain: frozenset[Path] = frozenset()) -> dict[str, Any]:
    """``{"section.key": value}`` from a preset file; raises ParamsError naming the file and key
    for anything but ``section: {key: value}`` mappings (sections and keys are checked against the
    schema when the merged params are validated). ``extends: other.yaml`` starts from another
    preset's keys."""
    path = Path(path)
    raw = read_yaml(path, "preset")
    if not isinstance(raw, dict) or not raw:
        raise ParamsError(f"{path}: a preset is a mapping of params sections")
    out: dict[str, Any] = {}
    base = raw.pop("extends", None)  # another preset (relative to this one) that this one changes
    if base is not None:
        if not isinstance(base, str) or (path.parent / base).resolve() in _chain:
            raise ParamsError(f"{path}: extends must name another preset file, without a cycle (got {base!r})")
        out = read_preset(path.parent / base, _chain | {path.resolve()})
    for section, keys in raw.items():
        if section == "paths" or not isinstance(keys, dict) or not keys:
            raise ParamsError(f"{path}: {section!r} must be a params section with the keys it changes (not paths)")
        out |= {f"{section}.{key}": value for key, value in keys.items()}
    return out


def with_preset(preset: str | Path | list[str | Path] | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides for ``load_params``: the preset's keys (if any; several presets in order, a
    later one winning: ``[params/omniglot.yaml, params/mining/batch-hard.yaml]``), then
    ``overrides`` on top."""
    out: dict[str, Any] = {}
    for path in [preset] if isinstance(preset, (str, Path)) else preset or []:
        out |= read_preset(path)
    return out | (overrides or {})


def _hydra(value: Any) -> str:
    """``value`` in Hydra's override grammar (what ``dvc exp run --set-param`` parses)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # Hydra's quoted strings: backslashes are literal except a run before a quote or the end,
        # which is doubled; the quote itself is escaped.
        return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"preset value {value!r}: unsupported type {type(value).__name__}")


def dvc_set_params(preset: dict[str, Any], params_yaml: Path) -> list[str]:
    """``--set-param`` values that give params.yaml the preset's keys. Hydra *merges* a mapping
    into an existing one, so a mapping that params.yaml already holds is deleted first (``~key``)
    and added whole (``+key=``); anything else is set or added (``++key=``)."""
    current = read_yaml(params_yaml, "params")
    out = []
    for dotted, value in preset.items():
        section, key = dotted.split(".", 1)
        if isinstance(current.get(section, {}).get(key), dict):
            out += [f"~{dotted}", f"+{dotted}={_hydra(value)}"]
        else:
            out.append(f"++{dotted}={_hydra(value)}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.params_preset",
                                description="run a DVC experiment with a params preset")
    p.add_argument("preset", type=Path, nargs="+", help="preset files, applied in order (a later one wins)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--print", action="store_true", help="print the dvc exp run arguments (JSON) instead of running")
    p.epilog = "Arguments after -- go to `dvc exp run` (--queue, -n NAME, -S key=value ...)."
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:split]), argv[split + 1 :]
    try:
        preset = with_preset(args.preset)
        # Checked as the flow checks it, before DVC rewrites params.yaml and deletes outputs.
        load_params(args.params, preset)
        sets = dvc_set_params(preset, args.params)
    except ParamsError as err:
        print(f"tripletflow: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    cmd = ["dvc", "exp", "run", *(x for s in sets for x in ("--set-param", s)), *extra]
    if args.print:
        print(json.dumps(cmd))
        return
    raise SystemExit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
