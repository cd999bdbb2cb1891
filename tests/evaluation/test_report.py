"""The Markdown table: this run's row, the paper's rows, the matching ablation row, footnotes for what is missing."""

from __future__ import annotations

from ham_engine.evaluation.paper import ABLATION, PAPER_ROWS, ablation_row
from ham_engine.evaluation.report import COLUMNS, markdown_table
from ham_engine.evaluation.suite import Evaluation

MISSING_VGG = "unavailable: put vgg16-397923af.pth into DIR/"


def _evaluation(**overrides: float | str) -> Evaluation:
    values: dict[str, float | str] = {key: 0.5 for key, _, _ in COLUMNS}
    values.update(overrides)
    return Evaluation(metrics=values, per_pair=[])


def test_the_run_row_comes_first_with_footnotes_for_unavailable_metrics() -> None:
    table = markdown_table(_evaluation(cfsd=MISSING_VGG, dc="unavailable: needs dino"), "this run")
    lines = table.splitlines()
    assert lines[0] == "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    assert lines[2] == ("| this run | 0.500 | 0.500 | 0.500 | 0.500 | n/a[1] | 0.500 | 0.500 | 0.500 | n/a[2] "
                        "| 0.500 |")
    assert lines[3].startswith("| HAM (paper) | 15.151 | (9.244) | 0.479 | — | — | 0.728 | 0.682 | 0.223 | 2.113 |")
    assert lines[4].startswith("| StyleID (CVPR'24) | 15.161 | (8.273) | 0.635 |")
    assert "[1] unavailable: put vgg16-397923af.pth into DIR/" in lines
    assert "[2] unavailable: needs dino" in lines


def test_an_ablation_run_is_printed_beside_the_papers_ablation_row() -> None:
    assert ablation_row(True, True, True) is None  # the full method: the HAM row is the comparison
    row = ablation_row(False, True, True)
    lines = markdown_table(_evaluation(), "no SINI", row).splitlines()
    assert lines[3] == "| HAM ablation: +GAR+LAT | — | — | — | — | — | 0.746 | 0.696 | 0.202 | — | — |"
    assert lines[4].startswith("| HAM (paper) |")


def test_the_papers_full_method_is_the_last_step_of_its_ablation() -> None:
    # PAPER.md: "full (+SINI) 0.728/0.682/0.223", the same figures as the table's HAM row.
    ham = PAPER_ROWS["HAM (paper)"]
    assert (ham["dino"], ham["clip_i"], ham["clip_t"]) == (0.728, 0.682, 0.223)
    assert len(ABLATION) == 4 and all(not sini for sini, _, _ in ABLATION)
