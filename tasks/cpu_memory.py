"""Keep freed memory in the process while training or embedding on a CPU (glibc's malloc).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
gives it back to the kernel on ``free``. A small CNN's first-block activations are 26 MiB at
28 px and 42 MiB at 36 px for a batch of 128, allocated and freed several times a step: each one
comes back as new pages that fault in one by one (~10,000 faults for 42 MiB). On a 2-core AMD
EPYC that made an out-of-place ReLU over 42 MiB take 15 ms instead of 1.9, and the Omniglot
preset's step 1.4× slower (README "Training throughput"). PyTorch's CPU allocator has no cache of
its own, so we ask glibc to keep what is freed: no mmap for large blocks, and no trimming of the
heap's top below 1 GiB. The process then holds its peak memory instead of returning it — the
same trade the CUDA caching allocator makes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of unmapping it; once per process.

    Process-wide and permanent (later stages of a Prefect flow run in the same process and keep
    it too). Returns False where there is no glibc (macOS, musl, Windows): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        if not hasattr(libc, "gnu_get_libc_version"):  # mallopt's parameters below are glibc's
            return False
        # mallopt returns 1 on success, 0 on error.
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
