"""The Markdown table: this run's row, the paper's rows, the matching ablation row, footnotes for what is missing."""

from __future__ import annotations

from pathlib import Path

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
    # The paper's ablation ends "full (+SINI) 0.728/0.682/0.223", the same figures as its table's HAM row.
    ham = PAPER_ROWS["HAM (paper)"]
    assert (ham["dino"], ham["clip_i"], ham["clip_t"]) == (0.728, 0.682, 0.223)
    assert len(ABLATION) == 4 and all(not sini for sini, _, _ in ABLATION)


def test_an_unverified_run_gets_no_paper_rows_and_says_why() -> None:
    evaluation = _evaluation()
    evaluation.unverified = ["DIR/vgg16-397923af.pth (cfsd) is not the published file: ..."]
    table = markdown_table(evaluation, "this run (tiny, 4 pairs, 64 px, 2 steps)", ablation_row(False, True, True))
    lines = table.splitlines()
    assert lines[2].startswith("| this run (tiny, 4 pairs, 64 px, 2 steps), UNVERIFIED weights | 0.500 |")
    assert "(paper)" not in table and "ablation" not in table and "StyleID" not in table
    assert "Not comparable with the paper" in table
    assert "- unverified: DIR/vgg16-397923af.pth (cfsd) is not the published file: ..." in lines


def test_the_docs_hold_the_papers_table_as_paper_py_does() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = docs.split("## The paper's numbers", 1)[1]
    columns = ("art_fid", "lpips", "dino", "clip_i", "clip_t", "dc", "cc")
    for method, row in PAPER_ROWS.items():
        line = next(line for line in section.splitlines() if line.startswith(f"| {method} |"))
        assert line == f"| {method} | " + " | ".join(f"{row[key]:.3f}" for key in columns) + " |"
    for name, values in ABLATION.values():
        step = name.removeprefix("HAM ablation: ")
        line = next(line for line in section.splitlines() if line.startswith(f"| {step} |"))
        assert line == f"| {step} | " + " | ".join(f"{values[k]:.3f}" for k in ("dino", "clip_i", "clip_t")) + " |"
