"""Run HAM over the pairs, resumably: an output made with the same inputs and parameters is reused.

Each pair writes ``outputs/<name>.png`` and ``outputs/<name>.json`` (the inputs' hashes,
model, parameters, engine stats and wall time). Both are written under a temporary name
and renamed into place, PNG first, so an interrupted run leaves either a complete pair
of files or none; a rerun redoes exactly the pairs whose record is missing or was made
differently (another model, other parameters, a changed input file).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ham_engine.evaluation.pairs import Pair
from ham_engine.files import write_atomically, write_text_atomically
from ham_engine.images import open_image
from ham_engine.params import TransferParams

RECORD_VERSION = 1


@dataclass(frozen=True)
class PairResult:
    """What a pair's run produced (or an earlier run did, when ``reused``)."""

    pair: Pair
    output: Path
    wall_s: float
    reused: bool
    stats: dict[str, Any]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _request(pair: Pair, model: str, params: TransferParams) -> dict[str, Any]:
    """What determines an output: if a stored record's request equals this, the output is reused.

    Round-tripped through JSON so it compares equal to what a record file holds (tuples become lists).
    """
    return json.loads(json.dumps({
        "version": RECORD_VERSION,
        "model": model,
        "content": {"file": pair.content.name, "sha256": file_digest(pair.content)},
        "style": {"file": pair.style.name, "sha256": file_digest(pair.style)},
        "params": asdict(params),
    }))


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _reusable(png: Path, record: dict[str, Any] | None, request: dict[str, Any]) -> bool:
    if record is None or record.get("request") != request or not png.is_file():
        return False
    try:
        with Image.open(png) as image:
            image.verify()
    except Exception:  # a damaged PNG is redone, whatever its record says
        return False
    return True


def run_pairs(
    engine: Any,
    pairs: list[Pair],
    params: TransferParams,
    out_dir: Path,
    quiet: bool = False,
) -> list[PairResult]:
    """Transfer every pair into ``out_dir/outputs`` (reusing what a previous run made); one result per pair.

    ``engine`` is a :class:`~ham_engine.engine.HamEngine`. A progress bar on stderr
    counts pairs (and the diffusion steps of the current one) unless ``quiet``.
    """
    from tqdm import tqdm

    outputs = out_dir / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)
    results: list[PairResult] = []
    total_steps = 2 * params.steps
    with tqdm(total=len(pairs), desc="eval", unit="pair", disable=quiet, file=sys.stderr) as bar:
        for pair in pairs:
            png, record_path = outputs / f"{pair.name}.png", outputs / f"{pair.name}.json"
            request = _request(pair, engine.model.name, params)
            record = _load_record(record_path)
            if _reusable(png, record, request):
                results.append(PairResult(pair, png, float(record["wall_s"]), True, record.get("stats", {})))
                bar.set_postfix_str(f"{pair.name} (reused)", refresh=False)
                bar.update()
                continue

            def progress(step: int, total: int, name: str = pair.name) -> None:
                bar.set_postfix_str(f"{name} step {step}/{total or total_steps}")

            started = time.perf_counter()
            content = open_image(pair.content, field="content")
            style = open_image(pair.style, field="style")
            result = engine.transfer(content, style=style, params=params, progress=progress)
            wall = time.perf_counter() - started
            write_atomically(png, lambda path, image=result.image: image.save(path, format="PNG"))
            record = {"request": request, "wall_s": wall, "stats": result.stats.to_dict()}
            text = json.dumps(record, indent=2, sort_keys=True, default=str)
            write_text_atomically(record_path, text)
            results.append(PairResult(pair, png, wall, False, record["stats"]))
            bar.update()
    return results
