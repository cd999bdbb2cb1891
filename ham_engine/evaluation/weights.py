"""Where each metric's published weights are looked for, and what to say when they are not there.

Nothing is downloaded. A checkpoint file is looked for, in order, in ``--weights DIR``,
then in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision and
pytorch-fid put their downloads); the LPIPS heads also in an installed ``lpips``
package (found without importing it: it imports torchvision). A ``transformers`` model
(CLIP, DINO) is a folder ``DIR/<name>`` (the id's last part) or a path given as the
model, else the Hugging Face cache (``HF_HOME``), read offline.

A missing one raises :class:`WeightsUnavailable`, whose message says what to put where;
the suite reports the metric as ``unavailable: <message>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


class WeightsUnavailable(Exception):
    """A metric's weights are not on this machine; ``str(exc)`` says what to put where."""


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint file a metric needs."""

    filename: str
    description: str  # what it is and who publishes it, for the message


# The published files, by the names their publishers give them.
FID_INCEPTION = Checkpoint("pt_inception-2015-12-05-6726825d.pth", "pytorch-fid's FID Inception weights")
ART_INCEPTION = Checkpoint("art_inception.pth", "art-fid's Inception fine-tuned on art (ArtFID)")
ALEXNET = Checkpoint("alexnet-owt-7be5be79.pth", "torchvision's ImageNet AlexNet (the LPIPS trunk)")
LPIPS_HEADS = Checkpoint("alex.pth", "LPIPS v0.1 AlexNet linear heads, lpips/weights/v0.1/alex.pth in the lpips wheel")
VGG16 = Checkpoint("vgg16-397923af.pth", "torchvision's ImageNet VGG-16 (the CFSD features)")


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_hub_checkpoints() -> Path:
    """torch's download cache for checkpoints: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _installed_lpips_heads() -> Path | None:
    # find_spec on a top-level package locates it without running its __init__ (which imports torchvision).
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "weights" / "v0.1" / "alex.pth"
        if candidate.is_file():
            return candidate
    return None


class WeightStore:
    """Finds metric weights under ``root`` (``--weights DIR``, may be None) and the libraries' caches."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"weights: folder {str(self.root)!r} does not exist")

    def _places(self) -> list[Path]:
        places = [self.root] if self.root is not None else []
        return [*places, torch_hub_checkpoints()]

    def find(self, checkpoint: Checkpoint) -> Path | None:
        """The checkpoint's path, or None when it is nowhere."""
        for place in self._places():
            candidate = place / checkpoint.filename
            if candidate.is_file():
                return candidate
            if checkpoint is LPIPS_HEADS and (place / "lpips" / checkpoint.filename).is_file():
                return place / "lpips" / checkpoint.filename
        return _installed_lpips_heads() if checkpoint is LPIPS_HEADS else None

    def checkpoint(self, checkpoint: Checkpoint) -> Path:
        """The checkpoint's path; :class:`WeightsUnavailable` saying where to put it when missing."""
        found = self.find(checkpoint)
        if found is None:
            raise WeightsUnavailable(self.missing_message(checkpoint))
        return found

    def missing_message(self, checkpoint: Checkpoint) -> str:
        given = f"{self.root}/" if self.root is not None else "DIR/ (and pass --weights DIR)"
        where = [given, f"{torch_hub_checkpoints()}/"]
        extra = " (or pip install --no-deps lpips)" if checkpoint is LPIPS_HEADS else ""
        return f"put {checkpoint.filename} ({checkpoint.description}) into {' or '.join(where)}{extra}"

    def pretrained_folder(self, model: str, what: str) -> Path:
        """A local ``transformers`` folder for ``model`` (a path, ``DIR/<name>``, or the HF cache)."""
        given = Path(model).expanduser()
        if given.is_dir():
            return given
        name = model.rstrip("/").rsplit("/", 1)[-1]
        if self.root is not None and (self.root / name).is_dir():
            return self.root / name
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # not an id, or not in the cache: either way it is not here
            pass
        where = f"{self.root}/{name}" if self.root is not None else f"DIR/{name} (and pass --weights DIR)"
        folder = f"{self.root}/{name}" if self.root is not None else f"DIR/{name}"
        raise WeightsUnavailable(
            f"put the Hugging Face folder of {model} ({what}) at {where}, e.g. `huggingface-cli download "
            f"{model} --local-dir {folder}` on a machine with the Hub, or into the Hugging Face cache"
        )
