"""The reproducibility record of an evaluation: what ran, on what, with which weights.

Model weights are identified by the SHA-256 of their files (``*.safetensors``, ``*.bin``
under ``unet/``, ``vae/``, ``text_encoder/``), so two runs that claim the same model can
be checked to have loaded the same bytes.
"""

from __future__ import annotations

import platform
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from ham_engine.evaluation.weights import sha256
from ham_engine.params import TransferParams

# Every weight folder a supported family has (a folder the model lacks is skipped).
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def model_folder(model: str) -> Path | None:
    """The local folder ``model`` was loaded from ("tiny" presets, a folder, or the HF cache), or None."""
    from ham_engine import tiny

    if model in tiny.PRESETS:
        return tiny.ensure_preset(model)
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached locally: the record says so instead of guessing
        return None


def model_weight_hashes(model: str) -> dict[str, str]:
    """``{"unet/diffusion_pytorch_model.safetensors": sha256, ...}`` for the model's weight files."""
    folder = model_folder(model)
    if folder is None:
        return {}
    hashes = {}
    for component in COMPONENTS:
        for path in sorted((folder / component).glob("*")):
            if path.suffix in (".safetensors", ".bin") and path.is_file():
                hashes[f"{component}/{path.name}"] = sha256(path)
    return hashes


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def reproducibility_record(engine: Any, params: TransferParams, pairing: str, wall_s: dict[str, float]) -> dict:
    """Everything needed to rerun and compare: model and hashes, versions, device, dtype, seed, params, timings."""
    import torch

    model = engine.model
    hashes = model_weight_hashes(model.name)
    return {
        "model": model.name,
        "model_weights_sha256": hashes or "unavailable: the model's files are not in a local folder or cache",
        "engine_version": _version("ham-style-transfer"),
        "params": asdict(params),
        "seed": params.seed,
        "pairs": pairing,
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor()
        or platform.machine(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
        },
        "wall_s_per_pair": wall_s,
    }
