import subprocess
import sys

import pytest

# Allocate, write and free a 64 MiB tensor, as a training step does with its activations; print
# the minor page faults of ten such steps after thirty of warm-up (the heap settles in a few: a
# 64-byte-aligned block does not fit the exact hole an equal one left, the first times).
PROBE = """
import resource, sys, torch
from tasks.cpu_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.rand(16 << 20)  # 64 MiB of float32
for _ in range(30):
    torch.relu(x)  # a new 64 MiB output, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.relu(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_freed_memory_is_reused_not_faulted_back_in():
    """With keep_freed_memory, a freed 64 MiB block is reused: ten more allocations cost almost no
    page faults (16,384 pages each when glibc unmaps and maps it again)."""
    applied, kept = _faults("keep")
    assert applied
    assert kept < 1_000
    _, system = _faults("system")
    # Without it every allocation faults its pages in again (fewer faults, not none, with
    # transparent huge pages set to "always").
    assert system > kept


def test_keep_freed_memory_runs_once_per_process():
    from tasks.cpu_memory import keep_freed_memory

    assert keep_freed_memory() is keep_freed_memory()
