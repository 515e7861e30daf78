"""Tests for tasks.cli: the stages' shared main()."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tasks.cli import json_line


def test_json_line_is_strict_json_with_null_for_non_finite_numbers():
    line = json_line({"train": {"loss": 0.5, "pos_distance": float("nan"), "rows": [1.0, float("inf")], "dev": object}})
    assert "NaN" not in line and "Infinity" not in line
    got = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # refuse NaN/Infinity
    assert got["train"]["pos_distance"] is None and got["train"]["rows"] == [1.0, None]
    assert got["train"]["loss"] == 0.5 and got["train"]["dev"].startswith("<class")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, -signal.SIGINT)])
def test_sigterm_unwinds_like_ctrl_c_leaving_no_temporary_file(tmp_path, signum, status):
    """Python's default SIGTERM (and SIGHUP, the terminal closed) ends the process on the spot: an
    atomic write's temporary file stayed beside its output. Here the stage is stopped inside one,
    and cleans up; it then ends as a shell expects of that signal — 143, 129, or death by SIGINT
    (an exit status of 130 let a shell loop of stages go on after Ctrl-C) — on one line, no
    traceback."""
    from conftest import ROOT

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    script = (
        "import signal, sys, time\nfrom pathlib import Path\nfrom tasks import cli, contracts\n"
        # Ctrl-C's KeyboardInterrupt even where this test runs with SIGINT ignored (a background job)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"  # and SIGHUP's default, where run under nohup
        "def run(params, paths):\n"
        "    with contracts.atomic_path(Path(paths.root) / 'out.bin') as tmp:\n"
        "        tmp.write_bytes(b'half'); print('writing', flush=True); time.sleep(600)\n"
        "cli.stage_main('ingest', run, ['--params', sys.argv[1]])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "params.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert [p.name for p in tmp_path.glob(".out.bin.*.tmp")]  # the half-written file, as it is being written
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status and err.strip() == "tripletflow ingest: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".tripletflow.lock") == ["params.yaml"]


def test_a_nohup_run_keeps_ignoring_sighup():
    """``nohup`` ignores SIGHUP so that the run outlives its terminal: stop_on_signals must not
    turn that into an interrupt."""
    from tasks.cli import stop_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop_on_signals()
        assert signal.getsignal(signal.SIGHUP) is signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_device_option_takes_what_a_stage_device_param_takes(capsys, gpus):
    """tasks.query and tasks.oneshot: --device cuda:x was a bare ValueError from deep inside, and
    a GPU the machine lacks an error naming a params key the commands do not have."""
    from tasks import oneshot, query
    from tasks.cli import device_arg

    gpus(2)
    assert [device_arg(v) for v in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    refused = [(2, "cuda:x", "'cuda:x': auto, cpu, cuda or cuda:N"),
               (2, "cuda:2", "'cuda:2' asked for, but this machine has 2 GPU(s)"),
               (0, "cuda", "'cuda' asked for, but CUDA is not available here")]
    for main, argv in ((query.main, ["x.png"]), (oneshot.main, ["--model", "m.pt", "--runs", "r.zip"])):
        for n, device, why in refused:
            gpus(n)
            with pytest.raises(SystemExit) as exit_:
                main(argv + ["--device", device])
            assert exit_.value.code == 2
            assert f"argument --device: {why}" in capsys.readouterr().err
