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


class _FakeLibc:
    def __init__(self, glibc: bool):
        self.calls = []
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize("glibc", [True, False])
def test_keep_freed_memory_sets_glibc_once_per_process(monkeypatch, glibc):
    """Both mallopt settings, once however often it is called; nothing without glibc."""
    from tasks import cpu_memory

    fake = _FakeLibc(glibc)
    monkeypatch.setattr(cpu_memory.ctypes.util, "find_library", lambda _name: "libc.so.6")
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda _name: fake)
    cpu_memory.keep_freed_memory.cache_clear()
    try:
        assert cpu_memory.keep_freed_memory() is glibc
        cpu_memory.keep_freed_memory()
    finally:
        cpu_memory.keep_freed_memory.cache_clear()  # the real call again for whoever comes next
    expected = [(cpu_memory.M_MMAP_MAX, 0), (cpu_memory.M_TRIM_THRESHOLD, cpu_memory.TRIM_THRESHOLD)]
    assert fake.calls == (expected if glibc else [])
