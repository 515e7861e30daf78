import pyarrow.parquet as pq

from tasks import contracts as C
from tasks import quarantine
from tasks.errors import DatasetError
from tasks.sources import Record, Rejected


def _rec(source, label, query=None, gallery=None):
    return Record(source=source, label=label, split=None, data=None, query=query, gallery=gallery)


def test_a_duplicate_says_which_row_it_copies_and_a_label_that_disagrees():
    assert quarantine.duplicate(_rec("a.png", "cat"), _rec("a.png", "cat")) == "listed twice"
    why = quarantine.duplicate(_rec("b.png", "dog"), _rec("a.png", "cat"))
    assert why == "duplicate of a.png (labelled 'cat' there, 'dog' here)"


def test_a_duplicate_names_the_evaluation_role_it_loses():
    """The kept copy is no query (the manifest said so): the dropped one was, and evaluation has one fewer."""
    why = quarantine.duplicate(_rec("b.png", "cat", query=True, gallery=True), _rec("a.png", "cat", query=False, gallery=True))
    assert why == "duplicate of a.png (a query here, not there: evaluation has one query fewer)"
    # Unknown roles (None) are the default protocol: nothing is said lost.
    assert quarantine.duplicate(_rec("b.png", "cat", query=True), _rec("a.png", "cat")) == "duplicate of a.png"


def test_decode_failures_fall_in_the_summary_categories():
    assert [quarantine.category(r) for r in ("too large: 9000×9000", "unreadable: EACCES", "missing", "empty file", "cannot identify image")] \
        == ["too large", "unreadable", "missing", "empty", "corrupt"]


def test_the_error_lists_the_skipped_files_by_category_most_first():
    rejected = [Rejected("x.png", "duplicate of y.png", "duplicate")] * 2 + [Rejected("z.png", "cannot identify image", "corrupt")]
    assert quarantine.detail(rejected) == "2 duplicate, 1 corrupt"
    err = quarantine.explained(DatasetError("no usable image"), rejected)
    assert str(err).startswith("no usable image; 3 files were skipped (2 duplicate, 1 corrupt), e.g. x.png: duplicate of y.png")
    plain = DatasetError("no usable image")
    assert quarantine.explained(plain, []) is plain


def test_the_report_is_written_also_when_nothing_was_skipped(tmp_path):
    path = tmp_path / "quarantine.parquet"
    quarantine.write([], path)
    assert pq.read_table(path).num_rows == 0
    quarantine.write([Rejected("x.png", "missing")], path)
    table, _ = C.read_table(path, C.QUARANTINE)
    assert table.to_pylist() == [{C.PATH: "x.png", C.REASON: "missing"}]
