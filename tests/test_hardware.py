from pathlib import Path

import pytest

from tasks import hardware


@pytest.mark.parametrize("text,expected", [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu sse2 amx_bf16 amx_tile amx_int8\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
    ("flags\t\t: fpu avx512_bf16x\n", False),  # a whole flag, not a prefix
    ("", False),
])
def test_bf16_flags_are_read_from_cpuinfo(text, expected):
    assert hardware.cpu_flags_have_bf16(text) is expected


def test_native_bf16_cpu_reads_the_file_once_and_a_missing_file_means_no(monkeypatch, tmp_path: Path):
    hardware.native_bf16_cpu.cache_clear()
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : avx512f avx512_bf16\n")
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    try:
        assert hardware.native_bf16_cpu() is True
        cpuinfo.unlink()
        assert hardware.native_bf16_cpu() is True  # cached: read once per process
        hardware.native_bf16_cpu.cache_clear()
        assert hardware.native_bf16_cpu() is False
    finally:
        hardware.native_bf16_cpu.cache_clear()
