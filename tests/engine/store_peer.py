"""Another process with its own engine on a shared feature store (run by test_feature_store.py).

``python -m tests.engine.store_peer STORE OUT CONTENT STYLE [CONTENT STYLE ...]`` loads the
tiny model (from ``HAM_TINY_DIR``), runs one transfer per (content, style) pair of image
paths, in order, and writes ``OUT/{i}.png`` and ``OUT/stats.json`` (a list of stats).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ham_engine.engine import HamEngine
from ham_engine.params import TransferParams

PARAMS = TransferParams(steps=4, size=64)


def main(argv: list[str]) -> None:
    store, out, *paths = argv
    torch.set_num_threads(1)
    engine = HamEngine.load("tiny", device="cpu", feature_store=store)
    stats = []
    for i, (content, style) in enumerate(zip(paths[::2], paths[1::2], strict=True)):
        result = engine.transfer(Image.open(content), style=Image.open(style), params=PARAMS)
        result.image.save(Path(out) / f"{i}.png")
        stats.append(result.stats.to_dict())
    (Path(out) / "stats.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main(sys.argv[1:])
