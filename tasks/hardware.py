"""What this machine's processors do fast — read once, shared by training and search.

On a CPU with bfloat16 arithmetic in hardware (AVX512-BF16, AMX) bf16 matrix products and
convolutions run ~2–3× faster than fp32 through oneDNN; on one without, they are emulated and
fp32 is the faster choice. Linux only: elsewhere the answer is "no" (fp32 — slower, never wrong).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags_have_bf16(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text lists a bf16 instruction set (avx512_bf16 or amx_bf16)."""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (read from /proc/cpuinfo once)."""
    try:
        return cpu_flags_have_bf16(CPUINFO.read_text())
    except OSError:
        return False
