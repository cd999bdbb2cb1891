"""What ``ham eval`` leaves for people: ``metrics.json``, a Markdown table beside the paper, a contact sheet.

- ``metrics.json``: the metrics (a number, or ``"unavailable: <what to put where>"``),
  each pair's values and wall time, the metric weights loaded (file, SHA-256, the
  published SHA-256 and whether it matched), and the reproducibility record (:mod:`.record`).
- ``table.md``: this run's row beside the paper's HAM and StyleID rows (:mod:`.paper`;
  their provenance is in docs/evaluation.md). A run on unverified metric weights gets no
  paper rows: its numbers do not measure what the paper's do, and the table says why.
- ``contact_sheet.png``: with ``--pairs all`` a grid, styles along the top, contents down
  the left, each output where its row and column meet; with ``diagonal`` one
  content | style | output row per pair. Each cell is a thumbnail padded to a square
  (192 px, smaller for big benchmarks so the sheet stays under 8000 px a side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from ham_engine.evaluation.paper import COMPARED, PAPER_ROWS, PAPER_SOURCE, PROTOCOL, implied_fid
from ham_engine.evaluation.runner import PairResult
from ham_engine.evaluation.suite import Evaluation, is_available
from ham_engine.files import write_atomically, write_text_atomically

METRICS_FILE = "metrics.json"
TABLE_FILE = "table.md"
CONTACT_SHEET_FILE = "contact_sheet.png"

# metrics.json key, column title (↓ lower is better, ↑ higher), decimals.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("art_fid", "ArtFID↓", 3),
    ("fid", "FID↓", 3),
    ("lpips", "LPIPS↓", 3),
    ("lpips_gray", "LPIPS-gray↓", 3),
    ("cfsd", "CFSD↓", 4),
    ("dino", "DINO↑", 3),
    ("clip_i", "CLIP-I↑", 3),
    ("clip_t", "CLIP-T↑", 3),
    ("dc", "DC↑", 3),
    ("cc", "CC↑", 3),
)
MAX_SHEET_SIDE = 8000
UNVERIFIED_NOTE = (
    "the paper's rows are not printed: some metric weights are not verified as the published ones "
    "(--allow-unverified-weights), so these numbers are not comparable with the paper's"
)


def write_metrics(out_dir: Path, evaluation: Evaluation, results: list[PairResult], record: dict[str, Any],
                  settings: dict[str, Any]) -> Path:
    """Write ``metrics.json``; returns its path."""
    pairs = []
    for result, values in zip(results, evaluation.per_pair, strict=True):
        pairs.append({
            "name": result.pair.name,
            "content": str(result.pair.content),
            "style": str(result.pair.style),
            "style_text": result.pair.style_text,
            "output": str(result.output.relative_to(out_dir)),
            "wall_s": round(result.wall_s, 4),
            "reused": result.reused,
            **values,
        })
    document = {
        "metrics": evaluation.metrics,
        "pairs": pairs,
        "metric_weights": evaluation.weights,
        "weights_verified": evaluation.verified,
        "unverified_weights": evaluation.unverified,
        "metric_settings": settings,
        "record": record,
        "paper": (
            {"protocol": PROTOCOL, "source": PAPER_SOURCE, "rows": {k: dict(v) for k, v in PAPER_ROWS.items()}}
            if evaluation.verified else {"omitted": UNVERIFIED_NOTE}
        ),
    }
    path = out_dir / METRICS_FILE
    write_text_atomically(path, json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
    return path


def markdown_table(evaluation: Evaluation, label: str, ablation: tuple[str, Any] | None = None) -> str:
    """This run's row (``label``) above the paper's compared rows, with footnotes for what is missing.

    ``ablation`` is the paper's ablation row (name, values) matching the run's modules, when
    the run switched some off (:func:`~.paper.ablation_row`); it is printed first. When
    the evaluation used unverified weights the row is marked so, no paper row is printed,
    and the footnotes name each unverified file.
    """
    header = "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    notes: list[str] = []
    cells = []
    for key, _, decimals in COLUMNS:
        value = evaluation.metrics.get(key)
        if isinstance(value, (int, float)) and is_available(value):
            cells.append(f"{value:.{decimals}f}")
        else:
            reason = str(value).removeprefix("unavailable: ")
            if reason not in notes:
                notes.append(reason)
            cells.append(f"n/a[{notes.index(reason) + 1}]")
    if not evaluation.verified:
        lines.append(f"| {label}, UNVERIFIED weights | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Not comparable with the paper: {UNVERIFIED_NOTE}.")
        lines.extend(f"- unverified: {problem}" for problem in evaluation.unverified)
        lines.extend(f"[{number}] unavailable: {note}" for number, note in enumerate(notes, 1))
        return "\n".join(lines) + "\n"
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    compared = [(method, PAPER_ROWS[method]) for method in COMPARED]
    if ablation is not None:
        compared.insert(0, ablation)
    for method, row in compared:
        cells = []
        for key, _, decimals in COLUMNS:
            if key in row:
                cells.append(f"{row[key]:.{decimals}f}")
            elif key == "fid" and "art_fid" in row:
                cells.append(f"({implied_fid(row['art_fid'], row['lpips']):.3f})")
            else:
                cells.append("—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Paper rows: {PAPER_SOURCE} ({PROTOCOL}). (x): FID implied by ArtFID = (1+LPIPS)(1+FID); "
                 "— : not reported.")
    for number, note in enumerate(notes, 1):
        lines.append(f"[{number}] unavailable: {note}")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, table: str) -> Path:
    """Write ``table.md`` (the text of :func:`markdown_table`); returns its path."""
    path = out_dir / TABLE_FILE
    write_text_atomically(path, table)
    return path


def _thumbnail(path: Path, side: int) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.pad(ImageOps.exif_transpose(image).convert("RGB"), (side, side), color=(255, 255, 255))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, side: int) -> None:
    # The default bitmap font is ~6 px a character: cut long names to the cell.
    limit = max(4, side // 6)
    draw.text(xy, text if len(text) <= limit else text[: limit - 1] + "…", fill=(0, 0, 0))


def contact_sheet(results: list[PairResult], pairing: str) -> Image.Image:
    """The contact sheet image of ``results`` (see the module docstring for the two layouts)."""
    label_height = 12
    if pairing == "all":
        contents = list(dict.fromkeys(r.pair.content for r in results))
        styles = list(dict.fromkeys(r.pair.style for r in results))
        columns, rows = len(styles) + 1, len(contents) + 1
    else:
        columns, rows = 3, len(results)
    side = max(48, min(192, MAX_SHEET_SIDE // max(columns, rows)))
    cell = side + label_height
    sheet = Image.new("RGB", (columns * side, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    def put(path: Path, column: int, row: int, text: str) -> None:
        sheet.paste(_thumbnail(path, side), (column * side, row * cell + label_height))
        if text:
            _label(draw, (column * side + 2, row * cell), text, side)

    if pairing == "all":
        _label(draw, (2, 0), "content \\ style", side)
        for column, style in enumerate(styles, 1):
            put(style, column, 0, style.stem)
        for row, content in enumerate(contents, 1):
            put(content, 0, row, content.stem)
        for result in results:
            row = contents.index(result.pair.content) + 1
            column = styles.index(result.pair.style) + 1
            put(result.output, column, row, "")
    else:
        for row, result in enumerate(results):
            put(result.pair.content, 0, row, f"content: {result.pair.content.stem}")
            put(result.pair.style, 1, row, f"style: {result.pair.style.stem}")
            put(result.output, 2, row, "output")
    return sheet


def write_contact_sheet(out_dir: Path, results: list[PairResult], pairing: str) -> Path:
    """Write ``contact_sheet.png``; returns its path."""
    sheet = contact_sheet(results, pairing)
    return write_atomically(out_dir / CONTACT_SHEET_FILE, lambda path: sheet.save(path, format="PNG"))


