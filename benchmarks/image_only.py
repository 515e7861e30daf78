"""Imports as on the lent GPU machine: only its image's distributions and the wheels in .whl/.

Installed as ``sitecustomize`` (benchmarks/gpu_prepare.sh copies it into a folder put first on
PYTHONPATH, so subprocesses — torchrun ranks, decode workers — get it too): any import of a
module whose distribution is neither in the image nor carried raises ModuleNotFoundError, as it
would there, before a GPU call spends device time on it. The image's list is the device
README's (KINDS.md, read on 2026-11-17); versions are not checked.
"""

import importlib.abc
import importlib.metadata
import os
import re
import sys
from pathlib import Path

IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed() -> set[str]:
    wheels = Path(os.environ.get("IMAGE_ONLY_WHEELS", ".whl"))
    carried = {_norm(w.name.split("-")[0]) for w in wheels.glob("*.whl")}
    return {_norm(n) for n in IMAGE.split()} | carried | {"tripletflow"}  # ours: the copied tree


class _ImageOnly(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.allowed = _allowed()
        self.owners = importlib.metadata.packages_distributions()  # top-level name -> distributions

    def find_spec(self, name, path=None, target=None):
        dists = self.owners.get(name.partition(".")[0])
        if not dists or any(_norm(d) in self.allowed for d in dists):
            return None  # the standard library, our own code, or there
        raise ModuleNotFoundError(f"{name} ({', '.join(dists)}) is neither in the GPU image nor in .whl/", name=name)


sys.meta_path.insert(0, _ImageOnly())
