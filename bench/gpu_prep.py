"""Prepare the GPU check here, without a GPU: everything the device run needs, in ``.gpu/``.

A GPU machine is lent rarely, for minutes, and reaches no network. Building the full-size
architectures there the way :mod:`ham_engine.architectures` does on a CPU (seeded weights drawn
tensor by tensor on the CPU: 73 s for SD 2.1-base and 190 s for SDXL-base on a 2-core machine)
would eat the device time, and their CLIP vocabulary and diffusers would have to come from
the package registry. So this step leaves in the working tree's ignored ``.gpu/`` folder:

* ``manifest.json``: the recipe of each architecture — its name in
  ``ham_engine.architectures.ARCHITECTURES`` (the published configs, in the code), a seed,
  the storage dtype, and its parameter and byte counts (checked here by building every
  component on the meta device, which takes seconds and allocates nothing);
* ``clip/bpe_simple_vocab_16e6.txt.gz``: open_clip's CLIP vocabulary (``make clip-vocab``
  puts it in ``.cache/clip/``), from which the tokenizers are written;
* ``wheels/``: the pure-Python wheels the device image lacks (diffusers), at the version
  installed here; ``bench/gpu_check.py`` unpacks them itself when diffusers is missing;
* ``tiny/``: the ``tiny`` and ``tiny-xl`` presets, so that ``gpu_check --smoke`` builds nothing.

On the device, :func:`materialize` writes an architecture from its recipe with the product's
own builder (:func:`ham_engine.architectures.build_architecture`: same layout, configs and
tokenizers), its weights drawn on the GPU instead of the CPU: seconds, not minutes. The
weights are random either way; they differ from a CPU build's (another generator), which
changes no figure the check reports.

    python -m bench.gpu_prep                 # ~1 min here; writes .gpu/ (~25 MB)
    python -m bench.gpu_prep --no-wheels     # without the package registry (the device then needs diffusers)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ham_engine import architectures, tiny  # noqa: E402

PREPARED = REPO / ".gpu"
MANIFEST = "manifest.json"
FORMAT = 1
SEED = 0
# What the device image lacks, as the machine's package list reads (torch, transformers,
# accelerate, safetensors, tokenizers, huggingface-hub and Pillow are there).
WHEELS = ("diffusers",)
SMOKE_PRESETS = ("tiny", "tiny-xl")


def _parameters(name: str) -> tuple[int, int]:
    """Parameter count and stored bytes of architecture ``name``, its components built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = architectures.ARCHITECTURES[name]
    storage = spec.get("storage", torch.float16)
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    count = 0
    with init_empty_weights():
        for _, class_name, fields in spec["text"]:
            config = CLIPTextConfig(vocab_size=architectures.CLIP_VOCAB_SIZE, max_position_embeddings=77, **fields)
            count += sum(t.numel() for t in classes[class_name](config).state_dict().values())
        for key, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            count += sum(t.numel() for t in cls.from_config(spec[key]).state_dict().values())
    return count, count * torch.tensor([], dtype=storage).element_size()


def _download_wheels(folder: Path) -> list[str]:
    """The installed version of each of :data:`WHEELS`, as a wheel from the package registry."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
            *pins,
        ],
        check=True,
    )
    return sorted(p.name for p in folder.glob("*.whl"))


def prepare(out: Path = PREPARED, wheels: bool = True) -> dict[str, Any]:
    """Write ``out`` (see the module docstring) and return its manifest."""
    started = time.perf_counter()
    vocab = architectures.find_clip_vocab()
    if vocab is None:
        raise SystemExit(f"{architectures.CLIP_VOCAB_FILE} not found: run `make clip-vocab` or set HAM_CLIP_VOCAB")
    out.mkdir(parents=True, exist_ok=True)
    (out / "clip").mkdir(exist_ok=True)
    shutil.copyfile(vocab, out / "clip" / architectures.CLIP_VOCAB_FILE)
    recipes = {}
    for name in ("sd21-base", "sdxl-base"):
        count, size = _parameters(name)
        storage = str(architectures.ARCHITECTURES[name].get("storage", torch.float16)).removeprefix("torch.")
        recipes[name] = {"seed": SEED, "storage": storage, "parameters": count, "bytes": size}
        print(f"recipe {name}: {count / 1e9:.2f} B parameters, {size / 1e9:.1f} GB as {storage}", file=sys.stderr)
    previous = os.environ.get("HAM_TINY_DIR")
    os.environ["HAM_TINY_DIR"] = str(out / "tiny")
    try:
        for name in SMOKE_PRESETS:
            tiny.ensure_preset(name)
    finally:
        if previous is None:
            os.environ.pop("HAM_TINY_DIR", None)
        else:
            os.environ["HAM_TINY_DIR"] = previous
    shutil.rmtree(out / "wheels", ignore_errors=True)
    wheel_files = _download_wheels(out / "wheels") if wheels else []
    manifest = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "architectures_format": architectures.FORMAT_VERSION,
        "architectures": recipes,
        "clip_vocab": f"clip/{architectures.CLIP_VOCAB_FILE}",
        "clip_vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
        "tiny": list(SMOKE_PRESETS),
        "wheels": wheel_files,
        "versions": {n: importlib.metadata.version(n) for n in ("torch", "diffusers", "transformers", "accelerate")},
        "prepare_seconds": round(time.perf_counter() - started, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def load_manifest(prepared: Path) -> dict[str, Any]:
    """The manifest of a prepared folder (ValueError when it is not one)."""
    path = prepared / MANIFEST
    if not path.is_file():
        raise ValueError(f"{prepared}: not prepared (no {MANIFEST}); run `python -m bench.gpu_prep`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}; prepare again")
    return manifest


@contextmanager
def _weights_drawn_on(device: torch.device) -> Iterator[None]:
    """``build_architecture`` with its seeded weights drawn on ``device`` (same scales, another generator).

    The product's builder draws on the CPU, tensor by tensor; on a GPU each draw is a single
    kernel, and the tensors come back to the CPU only to be written.
    """

    def random_state(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        state = {}
        for name, meta in module.state_dict().items():
            generator = torch.Generator(device).manual_seed(
                seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
            )
            if meta.ndim >= 2:
                tensor = torch.randn(meta.shape, generator=generator, device=device).mul_(meta[0].numel() ** -0.5)
            elif name.endswith("bias"):
                tensor = torch.zeros(meta.shape, device=device)
            else:
                tensor = torch.ones(meta.shape, device=device)
            state[name] = tensor.to(dtype).cpu()
        return state

    with mock.patch.object(architectures, "_random_state", random_state):
        yield


def materialize(name: str, prepared: Path, root: Path, device: torch.device) -> Path:
    """The folder of architecture ``name`` under ``root``, written from the recipe in ``prepared`` if missing."""
    recipe = load_manifest(prepared)["architectures"][name]
    target = root / f"{name}.{recipe['storage']}.seed{recipe['seed']}.{device.type}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        with _weights_drawn_on(device):
            architectures.build_architecture(
                name, staging, prepared / "clip" / architectures.CLIP_VOCAB_FILE, seed=recipe["seed"]
            )
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PREPARED, help="the prepared folder (default .gpu/, ignored)")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (no package registry needed)")
    args = parser.parse_args(argv)
    manifest = prepare(args.out, wheels=not args.no_wheels)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"prepared {args.out} in {manifest['prepare_seconds']:.0f} s ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
