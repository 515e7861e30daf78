"""Serve the pipeline on one machine: a scheduled deployment without a work pool or worker.

    python -m flows.serve [--name nightly-retrain-served] [--cron "0 3 * * *"] [--params params.yaml] [--preset params/omniglot.yaml] [--set key=value ...]

Needs a Prefect server (``prefect server start``, ``PREFECT_API_URL``) for its schedule to fire;
runs until stopped, executing scheduled and API-triggered runs in this process's machine. For
several machines use the work-pool deployments of ``infra/prefect.yaml`` instead. Overrides are
validated against params.yaml before anything is registered. A deployment of the same name that
runs on a work pool (``infra/prefect.yaml``'s ``nightly-retrain``) is not taken over: serving it
would drop its pool and pull steps, and Prefect pauses a served deployment when serving stops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.pipeline import parse_set, pipeline, resolve_presets
from tasks.cli import USER_ERRORS
from tasks.params import load_params
from tasks.params_preset import with_preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="nightly-retrain-served", help="deployment name")
    parser.add_argument("--cron", default="0 3 * * *", help="schedule (cron, UTC)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--preset", action="append", default=[],
                        help="a params preset file (params/omniglot.yaml); again for another, applied after it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    params_file = Path(args.params).resolve()
    preset = resolve_presets(args.preset)
    try:
        overrides = parse_set(args.overrides)
        load_params(params_file, with_preset(preset, overrides))
    except USER_ERRORS as err:  # a typo must not become a deployment that fails every night
        raise SystemExit(f"tripletflow: error: {err}") from None
    pool = _work_pool_of(f"{pipeline.name}/{args.name}")
    if pool:
        raise SystemExit(f"tripletflow: error: deployment {pipeline.name}/{args.name} runs on work pool {pool!r} "
                         "(prefect deploy); serving it here would take it over: choose another --name")
    pipeline.serve(
        name=args.name,
        cron=args.cron,
        parameters={"params_file": str(params_file), "overrides": overrides} | ({"preset": preset} if preset else {}),
        description="tripletflow retrain (flow.serve)",
    )


def _work_pool_of(deployment: str) -> str | None:
    """The work pool of an existing deployment of that name, None if none (or none exists)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(deployment).work_pool_name
        except ObjectNotFound:
            return None


if __name__ == "__main__":
    main()
