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
