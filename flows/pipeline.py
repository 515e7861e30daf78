"""The pipeline as a Prefect 3 flow: the same six stage functions as ``dvc repro``, as tasks.

Entrypoint ``flows/pipeline.py:pipeline``. Runs offline on Prefect's ephemeral API (no server).
Defaults come from params.yaml; the flow's only parameters are the file and dotted *overrides*
(``{"train.miner.type_of_triplets": "hard"}``), validated exactly like the file.

One MLflow parent run per flow run: created here with every param flattened, handed to train, and
picked up by the later stages from ``paths.run_info`` — the same path ``dvc repro`` takes.

    python -m flows.pipeline [--params params.yaml] [--set train.loss.margin=0.1 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import yaml


# Offline-friendly defaults (a user's own settings win): no analytics, and time for the ephemeral
# API server's first start on a slow machine (~17 s measured; Prefect's default limit is 20 s).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from tasks import build_index, evaluate, export_embeddings, fewshot, ingest, make_batches, preflight, project_lock, tracking, train  # noqa: E402
from tasks.errors import ParamsError, UserInputError  # noqa: E402
from tasks.params import flatten, load_params, yaml_load  # noqa: E402
from tasks.params_preset import with_preset  # noqa: E402


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback (``exc_info=True``, whatever the
    exception; no setting turns that off for some exceptions only). For our named errors of the
    user's input (UserInputError: bad params, unusable data) the run logs keep Prefect's line naming
    the error and drop the traceback; any other keeps it — a FileNotFoundError too, which the CLI
    reports as one line but which in a deployment's log may be a bug's only trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.exc_info, tuple) and isinstance(record.exc_info[1], UserInputError):
            record.exc_info = record.exc_text = None
        return True


# The run loggers Prefect's engine logs failures to (get_run_logger's; its logging.yml names them):
# standard logging filters, which Prefect's own configuration (dictConfig) leaves in place.
for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForUserErrors())


def is_transient(task, task_run, state) -> bool:
    """Retry I/O hiccups, not the user's input: bad params or data fail the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), UserInputError)


HOUR = 3600


def _as_task(module, retries: int, timeout_h: float, persist: bool = False):
    """A Prefect task around a stage's ``run``. No caching: DVC is our cache; retries only for
    stages whose failures can be transient (file systems, network storage), not for training.
    Timeouts are generous: they catch a hung stage (a stale network mount), not a long run.
    ``persist``: keep the result in Prefect's result storage (the metrics, readable from the API
    after the run). Under a key of its own, one per task run: Prefect writes a result under its
    cache key, and ``cache_policy=NONE`` gives none — the result was silently not kept."""
    name = module.__name__.rsplit(".", 1)[-1]
    keep = {"result_storage_key": f"tripletflow-{name}-{{task_run.id}}"} if persist else {"cache_policy": NONE}
    return task(
        module.run, name=name, retries=retries, retry_delay_seconds=2, retry_condition_fn=is_transient,
        timeout_seconds=timeout_h * HOUR, persist_result=persist, **keep,
    )


ingest_task = _as_task(ingest, retries=2, timeout_h=12)
make_batches_task = _as_task(make_batches, retries=2, timeout_h=1)
train_task = _as_task(train, retries=0, timeout_h=72)
export_task = _as_task(export_embeddings, retries=2, timeout_h=12)
index_task = _as_task(build_index, retries=2, timeout_h=12)
evaluate_task = _as_task(evaluate, retries=1, timeout_h=6, persist=True)


def report(metrics: dict[str, Any], run_id: str, root: Path) -> str:
    """The flow run's markdown artifact: the metrics as a table and where to find the MLflow run."""
    rows = "".join(
        f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n" for k, v in metrics.items()
    )
    return (
        "# tripletflow retrieval metrics\n\n| metric | value |\n|---|---|\n" + rows
        + f"\nMLflow run: {tracking.run_link(root, run_id)}\n"
    )


@flow(name="tripletflow", log_prints=True)
def pipeline(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, preset: str | list[str] | None = None
) -> dict[str, Any]:
    """ingest → make_batches → train → export_embeddings → build_index → evaluate; returns the
    metrics and the MLflow run id. ``preset``: a params preset file (``params/omniglot.yaml``;
    relative to the params file's folder) or a list of them, applied in order before ``overrides``."""
    preset_files = _preset_paths(params_file, preset)
    params = load_params(params_file, with_preset(preset_files, overrides))  # invalid params: fail before any output
    preflight.check(params)  # and params this machine cannot run (no CUDA, no weights file)
    paths = params.paths
    root = Path(paths.root)
    logger = get_run_logger()
    # Before the MLflow run: a second run in this project stops here, leaving no run behind.
    with project_lock.hold(root, f"flow run {flow_run.name or flow_run.id}"):
        run_id = tracking.start_pipeline_run(
            root, params.train.experiment, {"prefect.flow_run_id": str(flow_run.id or ""), "tripletflow.runner": "prefect"}
            | ({"tripletflow.preset": preset if isinstance(preset, str) else ",".join(preset)} if preset else {})
        )
        tracking.Tracker(root, run_id).params(flatten(params.model_dump(exclude={"paths"})))
        logger.info("MLflow run %s (%s)", run_id, tracking.tracking_uri(root))
        try:
            ingest_task(params.ingest, paths)
            fewshot.check_items(params.evaluate.few_shot, paths["items"])  # evaluate's refusal, before training
            make_batches_task(params.make_batches, paths)
            train_task(params.train, paths, parent_run_id=run_id)
            export_task(params.export_embeddings, paths)
            index_task(params.build_index, paths)
            metrics = evaluate_task(params.evaluate, paths)
        except BaseException as err:
            tracking.finish_pipeline_run(root, run_id, tracking.ended_by(err))
            raise
        logger.info("metrics: %s", json.dumps(metrics))
        if "model_alias" in metrics:
            logger.info("model registry: %s v%s is the %s (%s)", metrics["registered_model"], metrics["model_version"],
                        metrics["model_alias"], metrics["alias_reason"])
        create_markdown_artifact(report(metrics, run_id, root), key="tripletflow-metrics",
                                 description="Retrieval metrics of this pipeline run")
        return {"run_id": run_id, "metrics": metrics}


def _preset_paths(params_file: str, preset: str | list[str] | None) -> list[Path]:
    presets = [preset] if isinstance(preset, str) else preset or []
    return [Path(params_file).parent / p for p in presets]  # an absolute preset stays absolute


def resolve_presets(files: list[str]) -> list[str] | None:
    """The command line's ``--preset`` files as absolute paths (a flow run may start elsewhere)."""
    return [str(Path(p).resolve()) for p in files] or None


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set`` values: ``key=value``, the value read as YAML (ParamsError when it is not)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = yaml_load(value)  # as params.yaml reads: 0.1 and 3e-4 are floats, [1, 5] a list
        except yaml.YAMLError as err:
            raise ParamsError(f"--set {key}: {value!r} is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    return out


def _few_retries() -> AbstractContextManager:
    """One retry, not five, for the API client when this process runs its own (ephemeral) API.
    Ctrl-C no longer reaches that server (flows.api_server), but a signal to every process at once
    still kills it with the flow (``systemctl stop`` signals the whole control group): the flow's
    report of the interrupt to the dead server then took 2.5 minutes of retries with back-off (16 s
    with one). A user's PREFECT_CLIENT_MAX_RETRIES, or a real server (PREFECT_API_URL), keeps
    Prefect's setting."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

    if get_current_settings().api.url or "PREFECT_CLIENT_MAX_RETRIES" in os.environ:
        return nullcontext()
    return temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 1})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="ingest → make_batches → train → export_embeddings → build_index → evaluate as a "
        "Prefect flow (offline, ephemeral API); prints the metrics and the MLflow run id as JSON.",
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: %(default)s)")
    parser.add_argument("--preset", action="append", default=[],
                        help="a params preset file applied before the --set values (params/omniglot.yaml; "
                        "relative to the current folder); again for another, applied after it "
                        "(params/mining/batch-hard.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one dotted key, the value read as YAML (train.optimizer.lr=3e-4, "
                        "evaluate.recall_at=[1,5]); repeatable")
    args = parser.parse_args(argv)
    from tasks.cli import USER_ERRORS, exit_interrupted, json_line, stop_on_signals

    stop_on_signals()

    try:
        # Validate before starting Prefect (its ephemeral server takes seconds to come up).
        params_file = str(Path(args.params).resolve())
        preset = resolve_presets(args.preset)
        overrides = parse_set(args.overrides)
        params = load_params(params_file, with_preset(preset, overrides))
        preflight.check(params)  # here too: one line, before Prefect's server and logs
        root = Path(params.paths.root)
        with project_lock.hold(root, "python -m flows.pipeline (starting)"):
            pass  # another run in this project: say so now (the flow run takes the lock itself)
        from flows import api_server  # after validation: Prefect's server module takes seconds to import

        api_server.start_detached()  # Ctrl-C reaches the flow, not the server it reports to
        with _few_retries():
            result = pipeline(params_file=params_file, overrides=overrides or None, preset=preset)
    except USER_ERRORS as err:
        raise SystemExit(f"tripletflow: error: {err}") from None
    except KeyboardInterrupt as err:
        # Ctrl-C, SIGTERM or SIGHUP. During a flow run Prefect's own SIGTERM handler crashes the
        # run, then hands the signal on to stop_on_signals's; SIGHUP goes to that handler directly
        # (Prefect has none). Either raises Terminated here.
        exit_interrupted("tripletflow", err)
    print(json_line(result))


if __name__ == "__main__":
    main()
