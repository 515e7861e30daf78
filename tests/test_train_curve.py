import csv

from tasks import train_curve


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_curve_keeps_statistics_beyond_the_usual_columns(tmp_path):
    """Cross-batch memory reports how full its queue is: that column reaches the CSV too."""
    path = tmp_path / "curve.csv"
    train_curve.write(path, [{"epoch": 0, "loss": 0.5, "memory_filled": 128.0}, {"epoch": 1, "loss": 0.4, "memory_filled": 256.0}])
    rows = _csv(path)
    assert [r["memory_filled"] for r in rows] == ["128", "256"] and rows[1]["loss"] == "0.4"
    assert rows[0]["mined"] == "nan"  # the usual columns stay, empty where a statistic is not made


def test_the_usual_columns_come_first_in_one_order_whatever_the_rows_order(tmp_path):
    """Two runs' curves line up column by column: a row's key order does not reorder the CSV."""
    path = tmp_path / "curve.csv"
    train_curve.write(path, [{"lr": 0.1, "extra": 1.0, "loss": 2.0, "epoch": 0}])
    header = path.read_text().splitlines()[0].split(",")
    assert header == [*train_curve.COLUMNS, "extra"]
    assert _csv(path)[0]["lr"] == "0.1" and _csv(path)[0]["epoch"] == "0"
