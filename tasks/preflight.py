"""What the params ask of this machine, checked before the first stage of a whole-pipeline run.

``load_params`` checks what params alone decide, in every process that loads them. Whether CUDA,
enough GPUs or a weights file are *here* is not a property of the params: a stage run by hand on
another machine (ingest on a CPU node, train on a GPU one), or ``python -m tasks.query`` after the
weights file that trained the model was removed, must not be refused for it. The Prefect flow runs
all six stages in one process on one machine, so it asks here first: a run bound to fail in train
fails before ingest and make_batches rewrite their outputs. (Each stage still checks its own
settings when it starts, before it writes anything.) Torch is asked only about what the params ask
for: with ``device: auto`` and one process CUDA is not touched here.
"""

from __future__ import annotations

from tasks.errors import ParamsError
from tasks.models import gpu_errors
from tasks.params import Params, pretrained_path


def machine_errors(params: Params) -> list[str]:
    """``key: why`` for each setting this machine cannot run."""
    errors = []
    for section in ("train", "export_embeddings", "evaluate"):
        settings = getattr(params, section)
        errors += gpu_errors(section, settings.device, getattr(settings, "processes", 1))
    t = params.train
    if t.pretrained is not None and t.backbone != "small_cnn":  # small_cnn with weights: load_params refuses
        from tasks.backbones import pretrained_file

        try:
            pretrained_file(t.backbone, pretrained_path(t.pretrained, params.paths.root))
        except ParamsError as err:
            errors.append(str(err))
    return errors


def check(params: Params) -> None:
    """Raise :class:`ParamsError` listing every setting this machine cannot run."""
    errors = machine_errors(params)
    if errors:
        raise ParamsError("params this machine cannot run\n" + "\n".join(f"  {e}" for e in errors))
