"""Result tables: the accuracy matrix's cells, and its Markdown layout."""

from __future__ import annotations

from cmoe.stages.report import MISSING, Row, accuracy_table


def test_accuracy_cells_are_percent_with_one_decimal_and_missing_for_tasks_not_learned_yet() -> None:
    table = accuracy_table(["after"], ["red", "blue"], [Row(["v1"], [80.04, None]), Row(["v2"], [79.96, 70.0])])
    assert table.header == ["after", "red", "blue"]
    assert table.rows == [["v1", "80.0", MISSING], ["v2", "80.0", "70.0"]]


def test_labels_and_trailing_cells_frame_the_accuracies_in_column_order() -> None:
    table = accuracy_table(["version", "task"], ["T1"], [Row(["v3", "red"], [91.5], ["approved"])], ["decision"])
    assert table.header == ["version", "task", "T1", "decision"]
    assert table.rows == [["v3", "red", "91.5", "approved"]]


def test_markdown_has_one_line_per_row_under_a_separator_as_wide_as_the_header() -> None:
    table = accuracy_table(["method"], ["red", "blue"], [Row(["cmoe"], [90.0, 85.0])])
    assert table.markdown().splitlines() == ["| method | red | blue |", "|---|---|---|", "| cmoe | 90.0 | 85.0 |"]
