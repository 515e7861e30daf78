"""Tests for tasks.cli: the stages' shared main()."""

from __future__ import annotations

import json

from tasks.cli import json_line


def test_json_line_is_strict_json_with_null_for_non_finite_numbers():
    line = json_line({"train": {"loss": 0.5, "pos_distance": float("nan"), "rows": [1.0, float("inf")], "dev": object}})
    assert "NaN" not in line and "Infinity" not in line
    got = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # refuse NaN/Infinity
    assert got["train"]["pos_distance"] is None and got["train"]["rows"] == [1.0, None]
    assert got["train"]["loss"] == 0.5 and got["train"]["dev"].startswith("<class")


def test_sigterm_unwinds_like_ctrl_c_leaving_no_temporary_file(tmp_path):
    """Python's default SIGTERM ends the process on the spot: an atomic write's temporary file
    stayed beside its output. Here the stage is stopped inside one, and cleans up."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom tasks import cli, contracts\n"
        "def run(params, paths):\n"
        "    with contracts.atomic_path(Path(paths.root) / 'out.bin') as tmp:\n"
        "        tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(600)\n"
        "cli.stage_main('ingest', run, ['--params', sys.argv[1]])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "params.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.glob(".out.bin.*.tmp")]  # the half-written file, as it is being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "tripletflow ingest: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".tripletflow.lock") == ["params.yaml"]


def test_a_device_option_takes_what_a_stage_device_param_takes(capsys):
    """tasks.query and tasks.oneshot: --device cuda:x was a bare ValueError from deep inside."""
    import pytest

    from tasks import oneshot, query
    from tasks.cli import device_arg

    import torch

    assert [device_arg(v) for v in ("auto", "cpu")] == ["auto", "cpu"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{gpus}"  # a GPU this machine lacks
    for main, argv in ((query.main, ["x.png"]), (oneshot.main, ["--model", "m.pt", "--runs", "r.zip"])):
        for device, why in (("cuda:x", "'cuda:x': auto, cpu, cuda or cuda:N"),
                            (missing, f"{missing!r} asked for, but " + (f"this machine has {gpus} GPU(s)" if gpus else "CUDA is not available here"))):
            with pytest.raises(SystemExit) as exit_:
                main(argv + ["--device", device])
            assert exit_.value.code == 2
            assert f"argument --device: {why}" in capsys.readouterr().err
