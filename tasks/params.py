"""Typed, validated params: the one schema of params.yaml.

Every stage and the Prefect flow load params.yaml through :func:`load_params`. An unknown key, a
missing key or a wrong type raises :class:`ParamsError` naming the dotted key (``train.loss.margin``)
before any stage touches an output. Pydantic runs in strict mode, so ``"3"`` is not silently an int.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import ParamsError

__all__ = ["ParamsError", "Params", "Paths", "load_params", "parse_params", "apply_overrides", "flatten"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Paths(_Strict):
    """Where each stage reads and writes, relative to ``root`` (the directory of params.yaml)."""

    root: str = "."  # filled in by load_params; never written in params.yaml
    raw: str  # the raw data ingest reads: a DVC dependency of ingest (dvc.yaml can't depend on a source's keys)
    items: str
    quarantine: str
    batches: str
    triplets: str
    model: str
    run_info: str
    train_state: str
    train_curve: str
    embeddings: str
    index: str
    index_ids: str
    index_report: str
    metrics: str
    recall_curve: str
    per_class_ap: str
    figures: str

    def __getitem__(self, name: str) -> Path:
        """``paths["model"]`` -> absolute Path of that entry."""
        value = getattr(self, name)
        path = Path(value)
        return path if path.is_absolute() else Path(self.root) / path


class DigitsSource(_Strict):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): the offline default."""

    kind: Literal["digits"]


class ImageFolderSource(_Strict):
    """``root/<label>/.../*.png|jpg`` trees or zips of one; label = relative folder path.

    Either ``root`` (one tree, split by class with ``ingest.test_fraction``) or ``train_root`` and
    ``test_root`` (an official split, e.g. Omniglot background / evaluation).
    """

    kind: Literal["image_folder"]
    root: str | None = None
    train_root: str | None = None
    test_root: str | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> "ImageFolderSource":
        has_split = self.train_root is not None or self.test_root is not None
        if self.root is None and not (self.train_root and self.test_root):
            raise ValueError("give either `root` or both `train_root` and `test_root`")
        if self.root is not None and has_split:
            raise ValueError("give either `root` or `train_root`/`test_root`, not both")
        return self


class ManifestSource(_Strict):
    """A CSV or Parquet table with columns ``path,label[,split][,is_query,is_gallery]``; paths are
    relative to the manifest's directory. Without ``split`` the classes are split by
    ``ingest.test_fraction``; ``is_query``/``is_gallery`` (both or neither) need ``split``."""

    kind: Literal["manifest"]
    path: str


class Download(_Strict):
    """A file fetched into the layout's ``root`` when it is missing, checked against its sha256.
    ``url`` may be ``https://``, ``file://`` or an absolute path; ``extract`` unpacks a .zip/.tar(.gz)
    there (again when a new version, another sha256, is configured)."""

    url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: str = Field(min_length=1)  # name under root
    extract: bool = False


class LayoutSource(_Strict):
    """A standard benchmark in its published directory layout under ``root``, read with its
    official split and query/gallery protocol (see tasks/layouts.py for each)."""

    kind: Literal["omniglot", "cub200", "cars196", "sop", "inshop", "gldv2", "fashion_mnist"]
    root: str
    downloads: list[Download] = Field(default_factory=list)


Source = Annotated[Union[DigitsSource, ImageFolderSource, ManifestSource, LayoutSource], Field(discriminator="kind")]
LAYOUT_KINDS = ("omniglot", "cub200", "cars196", "sop", "inshop", "gldv2", "fashion_mnist")
_SOURCE_KINDS = ("digits", "image_folder", "manifest", *LAYOUT_KINDS)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{values} repeats a value")
    return values


class IngestParams(_Strict):
    source: Source
    image_size: int = Field(gt=0, le=1024)
    channels: Literal[1, 3]
    test_fraction: float = Field(gt=0, lt=1)
    workers: int = Field(ge=0)  # processes reading, hashing and decoding images; 0 = one per core
    # Rotated copies of every train image, each angle a new class ("<label>@rot<deg>"): 4× the
    # training classes for rotation-sensitive data such as characters. Test images never.
    train_rotations: Annotated[list[Literal[90, 180, 270]], AfterValidator(_distinct)]
    # A source's own split with a class on both sides: an error (open-set protocol), or allowed.
    shared_classes: Literal["error", "allow"]
    seed: int


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # a stage's device; the query and oneshot CLIs' --device


class MakeBatchesParams(_Strict):
    classes_per_batch: int = Field(ge=2)  # P
    images_per_class: int = Field(ge=2)  # K
    epochs: int = Field(ge=0)  # 0 = an untrained network (the baseline every run must beat)
    small_classes: Literal["replace", "drop"]
    # Share of the train classes held out of the plan for validation (train logs their Recall@1
    # per epoch and can stop early on it); 0 = none. Test classes are never used for this.
    val_fraction: float = Field(ge=0, lt=1)
    triplets_per_anchor: int = Field(ge=0)
    seed: int


# pml arguments that take an object, given in params by the class's name — ``distance:
# CosineSimilarity`` — or as a component, ``{name: LpDistance, normalize_embeddings: false}``.
NESTED = {
    "distance": "pytorch_metric_learning.distances",
    "reducer": "pytorch_metric_learning.reducers",
    "embedding_regularizer": "pytorch_metric_learning.regularizers",
    "weight_regularizer": "pytorch_metric_learning.regularizers",
}
# pml arguments that take code, or objects train composes (a cross-batch memory's loss and miner);
# also any whose default is a function (PerAnchorReducer's aggregation_func).
NOT_IN_PARAMS = frozenset({"loss", "miner", "losses", "miners", "weight_init_func", "aggregation_func", "iter_fn",
                           "reducers", "default_reducer"})
# Counts: whole numbers, whatever the default shows (None, or an int where a float is fine for
# other arguments); pml fills num_classes and embedding_size from the data: leave them out.
INTEGER_ARGS = frozenset({"num_classes", "embedding_size", "descriptors_dim", "n_bins", "num_bins", "pos_per_bin",
                          "neg_per_bin", "centers_per_class", "sub_centers", "K", "batch_size", "memory_size"})


class Component(BaseModel):
    """A class chosen by name plus its keyword arguments, e.g. ``{name: TripletMarginLoss, margin: 0.2}``."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def built_kwargs(self) -> dict[str, Any]:
        """The kwargs with each object-valued one (:data:`NESTED`) built from its name."""
        return {k: _build_nested(v, NESTED[k]) if k in NESTED and v is not None else v for k, v in self.kwargs.items()}


def nested_component(value: Any) -> Component:
    """A NESTED argument's value (a class name, or a mapping with ``name``) as a Component;
    ValueError when it is neither."""
    if isinstance(value, str):
        return Component(name=value)
    if isinstance(value, dict):
        try:
            return Component.model_validate(value)
        except ValidationError:
            pass
    raise ValueError(value)


def _build_nested(value: Any, module: str) -> Any:
    spec = nested_component(value)
    return getattr(importlib.import_module(module), spec.name)(**spec.built_kwargs())


def _check_component(spec: Component | None, module: str, key: str) -> list[str]:
    """Errors for a class name absent from ``module`` or a kwarg its constructor does not take."""
    if spec is None:
        return []
    mod = importlib.import_module(module)
    cls = getattr(mod, spec.name, None)
    if not inspect.isclass(cls):
        return [f"{key}.name: {spec.name!r} is not a class in {module}"]
    accepted = constructor_args(cls)
    errors = [f"{key}.{kw}: {spec.name} takes no argument {kw!r}" for kw in spec.kwargs if kw not in accepted]
    defaults = _defaults(cls)
    for kw, value in spec.kwargs.items():
        if kw not in accepted:
            continue
        if kw in NESTED:
            errors += _nested_errors(value, NESTED[kw], f"{key}.{kw}")
            continue
        if kw in NOT_IN_PARAMS or (callable(defaults.get(kw)) and not isinstance(defaults.get(kw), type)):
            errors.append(f"{key}.{kw}: takes a Python object, which params cannot give (leave it out)")
            continue
        if kw in INTEGER_ARGS:
            if not _whole(value) and not (value is None and _default_is_none(cls, kw)):
                errors.append(f"{key}.{kw}: expected an integer, got {value!r}"
                              + (" (leave it out: train fills it from the data)" if kw in ("num_classes", "embedding_size") else ""))
            continue
        if kw == "triplets_per_anchor":  # pml: "all", or that many triplets per anchor
            if value != "all" and not (_whole(value) and value >= 1):
                errors.append(f"{key}.{kw}: expected \"all\" or a positive integer, got {value!r}")
            continue
        want = type(defaults.get(kw))
        # A quoted number is a string; catch that here rather than deep in torch.
        # An int default (momentum=0) is a number too: 0.9 is fine there.
        if want in (float, int) and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            hint = " (a string: write the number without quotes)" if _looks_numeric(value) else ""
            errors.append(f"{key}.{kw}: expected a number, got {value!r}{hint}")
        elif want in (bool, str) and not isinstance(value, want):
            errors.append(f"{key}.{kw}: expected {want.__name__}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):  # .nan is YAML: no library checks it
            errors.append(f"{key}.{kw}: expected a finite number, got {value!r}")
    return errors


def _nested_errors(value: Any, module: str, key: str) -> list[str]:
    """Errors for an object-valued argument (:data:`NESTED`): its class, its own arguments, and
    whether it builds (a distance or reducer holds no weights: cheap)."""
    if value is None:
        return []
    try:
        spec = nested_component(value)
    except ValueError:
        return [f"{key}: expected a class name of {module} or {{name: <class>, <argument>: <value>}}, got {value!r}"]
    errors = _check_component(spec, module, key)
    return errors or _construct_errors(getattr(importlib.import_module(module), spec.name), spec, key)


def _whole(value: Any) -> bool:
    """An integer, not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _inits(cls: type) -> Iterator[Mapping[str, inspect.Parameter]]:
    """The parameters of each ``__init__`` up the class hierarchy, nearest first."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            yield inspect.signature(init).parameters


def _default_is_none(cls: type, kw: str) -> bool:
    """``kw``'s default in the first constructor up the hierarchy that names it is None."""
    return next((params[kw].default is None for params in _inits(cls) if kw in params), False)


def constructor_args(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes. pytorch-metric-learning classes forward
    **kwargs to their bases (CosFaceLoss(*args, **kwargs)): the union up the class hierarchy
    for as long as each __init__ forwards **kwargs."""
    accepted: set[str] = set()
    for signature in _inits(cls):
        params = signature.values()
        accepted |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    accepted.discard("self")
    return accepted


def _optimizer_errors(spec: Component, key: str) -> list[str]:
    """The optimizer's own checks (torch's constructors refuse a negative lr, betas outside
    [0, 1), ...), asked of it on a stand-in parameter: else train would find them after ingest
    and make_batches had rewritten their outputs."""
    import torch

    return _construct_errors(getattr(torch.optim, spec.name), spec, key, [torch.nn.Parameter(torch.zeros(1))])


def _construct_errors(cls: type, spec: Component, key: str, *args: Any) -> list[str]:
    """``cls(*args, **spec.kwargs)``; its error, if any, as ``key: Name(k=v, ...): message``.
    Libraries raise ValueError, TypeError, AssertionError... for a bad argument: any is caught."""
    try:
        cls(*args, **spec.built_kwargs())
    except Exception as err:
        call = f"{spec.name}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())})"
        return [f"{key}: {call}: {' '.join(str(err).split())}"]
    return []


def _looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _defaults(cls: type) -> dict[str, Any]:
    """Constructor defaults up the class hierarchy (the first class that sets one wins)."""
    out: dict[str, Any] = {}
    for params in _inits(cls):
        for p in params.values():
            if p.default is not p.empty and p.default is not None:
                out.setdefault(p.name, p.default)
    return out


class AugmentParams(_Strict):
    """Batch augmentation on the device (tasks.augment): always used by self-supervised training,
    by supervised training when ``supervised`` is true."""

    supervised: bool  # also warp the images of supervised training (a fresh draw per image and step)
    crop_scale: list[Annotated[float, Field(gt=0, le=1)]] = Field(min_length=2, max_length=2)  # area kept
    rotate: float = Field(ge=0, le=180)  # degrees, ±
    translate: float = Field(ge=0, le=1)  # fraction of the side, ± (as torchvision's RandomAffine)
    hflip: bool
    brightness: float = Field(ge=0, lt=1)
    contrast: float = Field(ge=0, lt=1)


class TrainParams(_Strict):
    # supervised: labels pick positives (P×K batches); self_supervised: no labels, two augmented
    # views of an image are each other's positive (the loss is wrapped in pml's SelfSupervisedLoss,
    # or fused when it is a plain NTXentLoss and fused_mining is on).
    mode: Literal["supervised", "self_supervised"]
    augment: AugmentParams
    backbone: str  # "small_cnn" or a torchvision model name (resnet18, ...)
    pretrained: str | None  # torchvision weights: null | default (torch's cache, never downloaded) | a file
    pooling: Literal["avg", "gem"]
    width: int = Field(gt=0)  # channels of the small CNN's blocks
    embedding_dim: int = Field(gt=0)
    freeze_backbone_epochs: int = Field(ge=0)  # first N epochs train only the embedding head
    lr_schedule: Literal["constant", "cosine"]
    warmup_epochs: int = Field(ge=0)  # linear LR warm-up over the first N epochs' steps
    grad_clip: float = Field(ge=0)  # max gradient norm; 0 = no clipping
    # Stop after N epochs without a better validation Recall@1 and keep the best epoch's weights;
    # 0 = off. Needs make_batches.val_fraction > 0.
    early_stopping_patience: int = Field(ge=0)
    loss: Component
    miner: Component | None
    optimizer: Component
    # TripletMarginLoss (+ TripletMarginMiner or no miner) and NTXentLoss (no miner) computed in one fused pass, equal to
    # pml's; other losses and miners always run as pml's.
    fused_mining: bool
    cross_batch_memory: int = Field(ge=0)  # >0: miner + loss also see the last N embeddings (XBM)
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast on CUDA and on CPUs with bf16 in hardware, else fp32
    channels_last: bool
    # torch.compile network + objective: true (inductor's default mode) | reduce-overhead (the same,
    # replayed as CUDA graphs: no per-kernel launch cost; on a CPU the same as true) | false.
    compile: bool | Literal["reduce-overhead"]
    device: str = Field(pattern=DEVICE_PATTERN)
    processes: int = Field(ge=1)  # data-parallel processes on this machine (one per GPU); >1 launches torchrun
    deterministic: bool  # deterministic kernels (cuDNN/cuBLAS); slower on GPU, needed for bit-exact reruns
    experiment: str = Field(min_length=1)
    seed: int


class ExportEmbeddingsParams(_Strict):
    batch_size: int = Field(gt=0)
    device: str = Field(pattern=DEVICE_PATTERN)
    processes: int = Field(ge=1)  # shard the rows over N processes (one per GPU; >1 launches torchrun)


class BuildIndexParams(_Strict):
    factory: str = Field(min_length=1)  # any faiss index_factory string, or auto (by collection size)
    metric: Literal["inner_product", "l2"]
    train_sample: int = Field(ge=0)  # IVF/PQ training vectors drawn with seed; 0 = all
    nprobe: int = Field(gt=0)  # IVF lists searched per query
    ef_search: int = Field(gt=0)  # HNSW search breadth (faiss efSearch)
    report_queries: int = Field(ge=0)  # gallery items sampled for the index report's recall@10 and queries/s
    seed: int


class FewShotParams(_Strict):
    """N-way K-shot episodes over the query classes (tasks.fewshot), for every N in ``ways`` and K in
    ``shots``; ``ways: []`` = off."""

    ways: list[Annotated[int, Field(ge=2)]]
    shots: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    queries: int = Field(gt=0)  # per class and episode
    episodes: int = Field(gt=0)


# The retrieval grids' limits (tasks.figures draws no more): rows of queries and results per row.
# A bigger grid is refused when params load, naming the key, rather than clamped with a warning:
# a clamped value would be recorded (DVC, MLflow) for a picture it does not describe, and a grid of
# thousands of thumbnails is unreadable anyway (grid_top_k also sizes what retrieval keeps per query).
GRID_MAX_ROWS, GRID_MAX_RESULTS = 100, 50


class EvaluateParams(_Strict):
    recall_at: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    map_at: int = Field(gt=0)  # mAP@k, Google Landmark Retrieval definition (k=100)
    grid_queries: int = Field(ge=0, le=GRID_MAX_ROWS)
    grid_top_k: int = Field(gt=0, le=GRID_MAX_RESULTS)
    worst_queries: int = Field(ge=0, le=GRID_MAX_ROWS)  # rows of the worst-queries grid (lowest AP@R)
    projection: Literal["pca", "tsne"]  # 2-D picture of the query embeddings
    projection_sample: int = Field(ge=0)  # points in it (seeded sample)
    # Exact search (tasks.search): one query_chunk × gallery_block float32 tile at a time bounds
    # memory (4096 × 16384 × 4 B = 256 MiB) whatever the collection size.
    device: str = Field(pattern=DEVICE_PATTERN)
    query_chunk: int = Field(gt=0)
    gallery_block: int = Field(gt=0)
    few_shot: FewShotParams
    # MLflow registered model that each evaluated model becomes a version of (champion/challenger
    # by mAP@R, see tasks.registry); null = do not log or register the model.
    registered_model: str | None = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    seed: int  # grid queries and few-shot episodes


class Params(_Strict):
    paths: Paths
    ingest: IngestParams
    make_batches: MakeBatchesParams
    train: TrainParams
    export_embeddings: ExportEmbeddingsParams
    build_index: BuildIndexParams
    evaluate: EvaluateParams


def _format(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        # Discriminated unions put the tag in the location (source.digits.root); drop it.
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-after")]
        loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] == "source" and p in _SOURCE_KINDS)]
        key = ".".join(loc) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        if e["type"] == "missing" and len(loc) > 1 and loc[-1] == "name":
            # A component (loss, miner, optimizer) in a preset replaces the whole key: {margin: 0.3}
            # alone drops the name the defaults gave.
            parent = ".".join(loc[:-1])
            got = (f" ({parent} is given whole, its class name with its arguments: a preset replaces it all; "
                   f"to change one argument, --set {parent}.<argument>=<value>)")
        lines.append(f"  {key}: {msg}{got}")
    return f"{origin}: invalid params\n" + "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``{"train.loss.margin": 0.1}``) in a copy of ``raw``.

    Only the flow and tests override; the defaults stay in params.yaml. An override of a section
    that does not exist is an error here, an unknown leaf is caught by validation.
    """
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for i, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"override {dotted!r}: no section {'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted!r}: {'.'.join(parents)!r} is not a section")
        node[leaf] = value
    return out


def parse_params(raw: Any, root: Path, origin: str = "params") -> Params:
    """Validate an already-loaded mapping; ``root`` anchors every relative path."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    if isinstance(raw.get("paths"), dict) and "root" in raw["paths"]:
        raise ParamsError(f"{origin}: paths.root is set by the loader, not in the file")
    raw = copy.deepcopy(raw)
    raw.setdefault("paths", {})
    if isinstance(raw["paths"], dict):
        raw["paths"]["root"] = str(root.resolve())
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err, origin)) from None
    # Classes chosen by name are checked once the types are right, so the message can name the
    # exact key (train.loss.margn), which a pydantic validator on `train` could not.
    t = params.train
    miner_errors = _check_component(t.miner, "pytorch_metric_learning.miners", "train.miner")
    errors = (
        _check_component(t.loss, "pytorch_metric_learning.losses", "train.loss")
        + miner_errors
        + _check_component(t.optimizer, "torch.optim", "train.optimizer")
    )
    errors += _choice_errors(t.miner, "train.miner", build=not miner_errors) + _cross_section_errors(params)
    errors += [] if errors else _objective_errors(t)
    errors += [] if errors else _optimizer_errors(t.optimizer, "train.optimizer")
    if errors:
        raise ParamsError(f"{origin}: invalid params\n" + "\n".join(f"  {e}" for e in errors))
    return params


# String arguments of pml classes that take one of a few words and do not check them
# (TripletMarginMiner mines "all" triplets for any unknown type_of_triplets).
_CHOICES = {("TripletMarginMiner", "type_of_triplets"): ("all", "hard", "semihard", "easy")}


def _choice_errors(spec: Component | None, key: str, build: bool = True) -> list[str]:
    """Word-valued arguments, then the miner's own checks (pml's constructors validate some
    arguments — BatchEasyHardMiner's strategies and their combinations — when train builds it);
    ``build`` False: its name or arguments are wrong (said already), so it is not built."""
    if spec is None:
        return []
    errors = [
        f"{key}.{kw}: {spec.name} takes one of {', '.join(_CHOICES[spec.name, kw])} (got {value!r})"
        for kw, value in spec.kwargs.items()
        if (spec.name, kw) in _CHOICES and value not in _CHOICES[spec.name, kw]
    ]
    if not errors:
        from pytorch_metric_learning import miners

        cls = getattr(miners, spec.name, None)  # an unknown name: _check_component has said so
        errors = _construct_errors(cls, spec, key) if build and cls is not None else []  # cheap: no weights
    return errors


def _objective_errors(t: TrainParams) -> list[str]:
    """Loss, miner, memory and mode that pml would refuse (or ignore) once training starts:
    self-supervised mode has no labels to mine or to fit class proxies to, and pml wraps only
    some losses in its self-supervised and cross-batch-memory wrappers."""
    from pytorch_metric_learning import losses

    errors = []
    if t.mode == "self_supervised":
        if t.miner is not None:
            errors.append(f"train.miner: self_supervised mode mines no pairs (each image's positive is its other "
                          f"view): set it to null (got {t.miner.name})")
        if t.cross_batch_memory:
            errors.append("train.cross_batch_memory: not used in self_supervised mode: set it to 0")
        if t.loss.name not in losses.SelfSupervisedLoss.supported_losses():
            errors.append(f"train.loss: {t.loss.name} cannot learn from two views without labels (self_supervised "
                          f"mode takes {', '.join(losses.SelfSupervisedLoss.supported_losses())})")
    elif t.cross_batch_memory and t.loss.name not in losses.CrossBatchMemory.supported_losses():
        errors.append(f"train.cross_batch_memory: pml's CrossBatchMemory cannot wrap {t.loss.name} (it takes "
                      f"{', '.join(losses.CrossBatchMemory.supported_losses())}): set it to 0 or change train.loss")
    size = t.loss.kwargs.get("embedding_size")
    if size is not None and size != t.embedding_dim:
        errors.append(f"train.loss.embedding_size: {size!r} is not train.embedding_dim ({t.embedding_dim}): "
                      "leave it out (it is filled from train.embedding_dim)")
    return errors


def _cross_section_errors(params: Params) -> list[str]:
    """Choices that the library using them (torchvision, faiss) would only reject when their stage
    starts — after the stages before it have rewritten their outputs — and settings of two sections
    that cannot work together whatever the data. Asked of the library itself
    (not of tasks.backbones / tasks.build_index: every stage loads params, and DVC would re-run
    ingest whenever those changed)."""
    errors = []
    t = params.train
    if t.early_stopping_patience and params.make_batches.val_fraction == 0:
        # Train's own check (at least 2 validation classes) needs the data; with no share held out
        # there are none whatever the data, so say it before ingest and make_batches rewrite theirs.
        errors.append(f"train.early_stopping_patience: {t.early_stopping_patience} needs validation classes, but "
                      "make_batches.val_fraction is 0 (none held out): raise it, or set the patience to 0")
    for name, section in (("train", t), ("export_embeddings", params.export_embeddings)):
        if section.processes > 1 and section.device.startswith("cuda:"):
            # torchrun gives each process its own GPU (LOCAL_RANK) only for "cuda": a numbered
            # device would put every process on that one GPU, and NCCL refuses.
            errors.append(f"{name}.device: {section.device!r} with {name}.processes {section.processes}: every process "
                          "would use that one GPU; set device to 'cuda' (one GPU per process) or 'auto'")
    if t.backbone == "small_cnn":
        if t.pretrained:
            errors.append("train.pretrained: small_cnn has no pretrained weights (null)")
    else:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models) + torchvision.models.list_models(
            module=torchvision.models.quantization)  # classifiers; get_model lowercases the name
        if t.backbone.lower() not in known:
            errors.append(f"train.backbone: unknown model {t.backbone!r} (small_cnn or a torchvision classification "
                          "model: resnet18, resnet50, efficientnet_b0, convnext_tiny, vit_b_16...)")
    b = params.build_index
    if b.factory != "auto":
        import faiss

        metric = faiss.METRIC_INNER_PRODUCT if b.metric == "inner_product" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(t.embedding_dim, b.factory, metric)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1].split(": ", 1)[-1]  # "could not parse index string Foo"
            errors.append(f"build_index.factory: faiss cannot build {b.factory!r} for {t.embedding_dim}-d vectors: {reason}")
        else:  # tasks.build_index.id_mapped's check, not imported: every stage imports params, so DVC
            # would make every stage depend on build_index's code (tests/test_dvc_graph.py)
            if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
                errors.append(f"build_index.factory: {b.factory!r}: drop the IDMap prefix (the stage keeps its own id map, "
                              "paths.index_ids)")
    return errors


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``3e-4`` (no dot) as a number as YAML 1.2 does — and DVC, which
    reads params.yaml too (PyYAML follows YAML 1.1: the string '3e-4')."""


_YamlLoader.add_implicit_resolver(  # after int's and float's: tried only where they do not match
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def yaml_load(text: str, name: str | None = None) -> Any:
    """YAML text -> Python values, as params files are read (:class:`_YamlLoader`). ``name``: the
    file the text came from, for PyYAML's error marks (else they say ``in "<unicode string>"``; a
    stream would name the file but lose the quoted line and its caret)."""
    loader = _YamlLoader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a missing or malformed file is a ParamsError naming it (``what``: the
    kind of file, for the message)."""
    try:
        return yaml_load(path.read_text(), str(path))
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such {what} file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read, override and validate params.yaml. Relative paths resolve against its directory.
    (A params preset reaches here as overrides: tasks.params_preset.with_preset.)"""
    path = Path(path)
    raw = read_yaml(path, "params")
    if overrides:
        raw = apply_overrides(raw, overrides)
    # The values may come from a preset or --set, not the file: say so where the error names it.
    return parse_params(raw, path.parent, origin=f"{path} with the preset / --set values" if overrides else str(path))


def project_origin(root: Path) -> Path:
    """The project as the user sees it: ``root`` — except in a DVC experiment that runs in a
    temporary copy of the repository (``dvc exp run --queue`` / ``--temp``), where it is the
    original repository (DVC names it in DVC_ROOT): what lies beside the project (``../data``)
    is beside the original, not beside the copy, and the MLflow store must outlive the copy."""
    root = Path(root).resolve()
    if os.environ.get("DVC_EXP_NAME") and os.environ.get("DVC_ROOT"):
        # The copy holds the repository from its top (where .dvc/ is); params.yaml may sit below it.
        top = next((d for d in (root, *root.parents) if (d / ".dvc").is_dir()), root)
        return Path(os.environ["DVC_ROOT"]).resolve() / root.relative_to(top)
    return root


def source_path(root: Path, rel: str) -> Path:
    """A source's path in params (relative to ``root``, or absolute): one that leads out of the
    project resolves against :func:`project_origin`."""
    path = Path(root) / rel
    if path.resolve().is_relative_to(Path(root).resolve()):
        return path
    return project_origin(root) / rel


def pretrained_path(pretrained: str | None, root: str | Path) -> str | None:
    """``train.pretrained`` as train loads it: null, ``default`` (torch's cache), or a file — a
    relative one resolved against ``root`` (the project: paths.root)."""
    if pretrained in (None, "default") or Path(pretrained).is_absolute():
        return pretrained
    return str(Path(root) / pretrained)


def flatten(params: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.loss.margin": 0.2, ...}`` — the form MLflow logs params in."""
    data = params.model_dump() if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
