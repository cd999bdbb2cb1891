"""Where each metric's published weights are looked for, and what to say when they are not there.

Nothing is downloaded. A checkpoint file is looked for, in order, in ``--weights DIR``,
then in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision and
pytorch-fid put their downloads); the LPIPS heads also in an installed ``lpips``
package (found without importing it: it imports torchvision). A ``transformers`` model
(CLIP, DINO) is a folder ``DIR/<name>`` (the id's last part) or a path given as the
model, else the Hugging Face cache (``HF_HOME``), read offline.

A missing one raises :class:`WeightsUnavailable`, whose message says what to put where;
the suite reports the metric as ``unavailable: <message>``.

A present one is checked against the SHA-256 its publisher gives (:func:`verify_checkpoint`,
:func:`verify_folder`): a file name says nothing about the bytes, and a random or
fine-tuned network under a published name would print numbers that look like the
paper's. Where no published hash is known offline the weights count as unverified;
docs/evaluation.md lists every hash and its source. ``ham eval`` refuses unverified
weights unless told ``--allow-unverified-weights``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path


class WeightsUnavailable(Exception):
    """A metric's weights are not on this machine; ``str(exc)`` says what to put where."""


class UnverifiedWeights(Exception):
    """Metric weights are present but not verified as the published ones; ``str(exc)`` names each file."""

    def __init__(self, checks: list[WeightCheck]) -> None:
        self.checks = checks
        problems = "; ".join(check.problem() for check in checks)
        super().__init__(
            f"weights: {problems}. Put the published files there, or pass --allow-unverified-weights to "
            "compute numbers marked unverified (printed without the paper's rows)"
        )


# torch.hub's naming convention (``check_hash``): ``name-<first hex digits of the SHA-256>.ext``.
_HUB_NAME_HASH = "the SHA-256 prefix in the published file name (torch.hub convention, checked by its check_hash)"


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint file a metric needs, and the SHA-256 its publisher gives for it."""

    filename: str
    description: str  # what it is and who publishes it, for the message
    # The published SHA-256 in hex: all 64 digits, or the leading digits where only those are
    # published (torch.hub file names); None where no published hash is known offline.
    sha256: str | None = None
    source: str = "no published SHA-256 is known offline"  # where ``sha256`` comes from


# The published files, by the names their publishers give them, with their published hashes
# (docs/evaluation.md, "Which weights are verified, against what").
FID_INCEPTION = Checkpoint(
    "pt_inception-2015-12-05-6726825d.pth", "pytorch-fid's FID Inception weights", "6726825d",
    f"pytorch-fid's release fid_weights: {_HUB_NAME_HASH}",
)
ART_INCEPTION = Checkpoint(
    "art_inception.pth", "art-fid's Inception fine-tuned on art (ArtFID)", None,
    "none known offline: art-fid downloads it from the Hugging Face Hub (matthias-wright/art_inception) "
    "without a hash in its code, and the Hub's own hash of it is not recorded in this repository",
)
ALEXNET = Checkpoint(
    "alexnet-owt-7be5be79.pth", "torchvision's ImageNet AlexNet (the LPIPS trunk)", "7be5be79",
    f"torchvision's AlexNet_Weights.IMAGENET1K_V1: {_HUB_NAME_HASH}",
)
LPIPS_HEADS = Checkpoint(
    "alex.pth", "LPIPS v0.1 AlexNet linear heads, lpips/weights/v0.1/alex.pth in the lpips wheel",
    "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "the RECORD of the lpips 0.1.4 wheel on PyPI (lpips/weights/v0.1/alex.pth)",
)
VGG16 = Checkpoint(
    "vgg16-397923af.pth", "torchvision's ImageNet VGG-16 (the CFSD features)", "397923af",
    f"torchvision's VGG16_Weights.IMAGENET1K_V1: {_HUB_NAME_HASH}",
)
CHECKPOINTS = (FID_INCEPTION, ART_INCEPTION, ALEXNET, LPIPS_HEADS, VGG16)

# A Hugging Face model (CLIP, DINO) is verified file by file against the hash the Hub publishes
# for it: a weight file in the HF cache is a link to ``blobs/<its SHA-256 as the Hub lists it>``.
HUB_SOURCE = "the Hugging Face Hub's SHA-256 of the file, as the Hugging Face cache records it (the blob's name)"
HUB_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class WeightCheck:
    """One weight file checked against its published SHA-256."""

    role: str  # the metric network it is for: fid, lpips_trunk, lpips_heads, cfsd, clip, dino
    file: str
    sha256: str
    expected: str | None  # the published SHA-256 (or its published prefix); None: none known
    source: str

    @property
    def verified(self) -> bool:
        """True when the file's SHA-256 is (or starts with) the published one."""
        return self.expected is not None and self.sha256.startswith(self.expected)

    def problem(self) -> str:
        """Why the file is not verified ("" when it is)."""
        if self.verified:
            return ""
        if self.expected is None:
            return f"{self.file} ({self.role}) cannot be verified: {self.source}"
        return (f"{self.file} ({self.role}) is not the published file: its SHA-256 is {self.sha256}, "
                f"the published one {'starts with ' if len(self.expected) < 64 else 'is '}{self.expected} "
                f"({self.source})")

    def as_record(self) -> dict[str, object]:
        """The check as ``metrics.json`` lists it."""
        return {"file": self.file, "sha256": self.sha256, "expected_sha256": self.expected,
                "hash_source": self.source, "verified": self.verified,
                "problems": [] if self.verified else [self.problem()]}


_HASHED: dict[tuple[str, int, int], str] = {}


def sha256(path: Path) -> str:
    """The file's SHA-256, hex (remembered per path, size and mtime: CLIP-L is 1.7 GB)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def verify_checkpoint(role: str, path: Path, checkpoint: Checkpoint) -> WeightCheck:
    """``path`` (found for ``checkpoint``) checked against the checkpoint's published SHA-256."""
    return WeightCheck(role, str(path), sha256(path), checkpoint.sha256, checkpoint.source)


def verify_folder(role: str, folder: Path) -> list[WeightCheck]:
    """Each weight file of a Hugging Face folder checked against the Hub's SHA-256 of it.

    Only a file that resolves into a Hugging Face cache's ``blobs/`` has a published hash
    to check (the blob's name); a folder copied elsewhere cannot be verified offline.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix in HUB_WEIGHT_SUFFIXES and p.is_file())
    checks = []
    for path in files:
        blob = path.resolve()
        if blob.parent.name == "blobs" and _SHA256_NAME.fullmatch(blob.name):
            checks.append(WeightCheck(role, str(path), sha256(path), blob.name, HUB_SOURCE))
        else:
            checks.append(WeightCheck(
                role, str(path), sha256(path), None,
                "not read from the Hugging Face cache, so there is no published SHA-256 to compare with "
                "(the Hub lists one per file; this repository does not hold them offline)",
            ))
    if not checks:
        checks.append(WeightCheck(role, str(folder), "", None, "the folder holds no weight file"))
    return checks


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

    def fid_checkpoint(self) -> Checkpoint:
        """art-fid's Inception when it is here (the ArtFID variant), else pytorch-fid's."""
        return ART_INCEPTION if self.find(ART_INCEPTION) is not None else FID_INCEPTION

    def audit(self, clip_model: str, dino_model: str) -> list[WeightCheck]:
        """Every metric weight that is here, checked against its published SHA-256 (missing ones are skipped).

        Run before a long evaluation so that unverified weights are refused in seconds,
        not after the transfers.
        """
        checks = []
        for role, checkpoint in (("fid", self.fid_checkpoint()), ("lpips_trunk", ALEXNET),
                                 ("lpips_heads", LPIPS_HEADS), ("cfsd", VGG16)):
            path = self.find(checkpoint)
            if path is not None:
                checks.append(verify_checkpoint(role, path, checkpoint))
        for role, model, what in (("clip", clip_model, "CLIP-I / CLIP-T"), ("dino", dino_model, "DINO")):
            try:
                checks.extend(verify_folder(role, self.pretrained_folder(model, what)))
            except WeightsUnavailable:
                continue  # reported as unavailable by the suite
        return checks

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
