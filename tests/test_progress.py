"""Tests for tasks.progress: tqdm on a terminal, plain lines in a log."""

from __future__ import annotations

import sys

from tqdm import tqdm

from tasks import progress


def test_in_a_log_a_line_at_each_tenth_then_one_at_the_end(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress.bar("train (cpu)", "batch", total=95)
    assert isinstance(bar, progress.LogLines)
    for step in range(95):
        bar.set_postfix(epoch=step // 10, loss="0.1000")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10  # 10 %, 20 % ... 100 %: the end already said, close adds nothing
    assert lines[0].startswith("train (cpu): 10% (10/95 batch) ")
    assert lines[-1].startswith("train (cpu): 100% (95/95 batch) ") and lines[-1].endswith("epoch=9, loss=0.1000")


def test_close_repeats_the_end_when_the_figures_after_the_last_step_changed(capsys, monkeypatch):
    """train sets the epoch's loss after its last step: the closing line must carry it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress.bar("train (cpu)", "batch", total=10)
    bar.update(10)
    bar.set_postfix(epoch=0, loss="0.5000")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[1].startswith("train (cpu): 100% (10/10 batch) ")
    assert lines[1].endswith("epoch=0, loss=0.5000")


def test_a_resumed_run_starts_from_its_initial_count_and_close_says_where_it_stopped(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress.bar("train (cpu)", "batch", total=100, initial=50)
    bar.update(5)  # within the 50 % tenth: nothing yet
    assert capsys.readouterr().err == ""
    bar.close()
    assert capsys.readouterr().err.startswith("train (cpu): 55% (55/100 batch) ")


def test_silence_is_broken_once_a_minute_and_an_unknown_total_counts(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    clock = iter([0.0, 1.0, 61.0, 62.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    bar = progress.bar("ingest: scan", "img")  # no total
    bar.update(4096)  # t = 1 s: quiet
    bar.update(4096)  # t = 61 s: a line
    assert capsys.readouterr().err.startswith("ingest: scan: 8,192 img 61 s, 134 img/s")
    bar.close()  # t = 62 s, nothing new since the last line
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_tqdm_and_other_ranks_nothing(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    on_terminal = progress.bar("x", "img", 10)
    assert isinstance(on_terminal, tqdm) and not on_terminal.disable
    on_terminal.close()
    off = progress.bar("x", "img", 10, enabled=False)
    off.update(10)
    off.close()
    assert isinstance(off, tqdm) and off.disable
