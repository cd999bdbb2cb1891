"""Metric weights are verified by the SHA-256 their publishers give, not by their file names."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from ham_engine.evaluation.suite import MetricSuite
from ham_engine.evaluation.weights import (
    ART_INCEPTION,
    CHECKPOINTS,
    FID_INCEPTION,
    HUB_SOURCE,
    LPIPS_HEADS,
    UnverifiedWeights,
    WeightStore,
    sha256,
    verify_checkpoint,
    verify_folder,
)
from tests.evaluation.conftest import write_clip

DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"


def test_every_checkpoint_has_its_published_hash_and_source_in_the_docs_table() -> None:
    section = DOCS.read_text(encoding="utf-8").split("## Which weights are verified, against what", 1)[1]
    table = section.split("\n\n", 2)[2]
    for checkpoint in CHECKPOINTS:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{checkpoint.filename}`"))
        if checkpoint.sha256 is None:
            assert "**not known offline**" in row and "**unverified**" in row
        else:
            assert f"`{checkpoint.sha256}`" in row
    # torch.hub names carry the hash's first digits: the table's prefix is the one in the name.
    for checkpoint in CHECKPOINTS:
        if checkpoint.sha256 is not None and len(checkpoint.sha256) < 64:
            assert checkpoint.filename.removesuffix(".pth").endswith(checkpoint.sha256)


def test_a_file_whose_hash_is_not_the_one_in_its_name_is_not_verified(tmp_path: Path) -> None:
    fake = tmp_path / FID_INCEPTION.filename
    fake.write_bytes(b"not an inception network")
    check = verify_checkpoint("fid", fake, FID_INCEPTION)
    assert check.sha256 == sha256(fake) and not check.sha256.startswith("6726825d")
    assert not check.verified
    assert check.problem() == (f"{fake} (fid) is not the published file: its SHA-256 is {check.sha256}, "
                               f"the published one starts with 6726825d ({FID_INCEPTION.source})")
    art = tmp_path / ART_INCEPTION.filename
    art.write_bytes(b"whatever it is")
    check = verify_checkpoint("fid", art, ART_INCEPTION)
    assert not check.verified and check.expected is None
    assert check.problem().startswith(f"{art} (fid) cannot be verified: none known offline")


def test_the_lpips_wheels_heads_are_the_published_file() -> None:
    installed = WeightStore(None).find(LPIPS_HEADS)
    if installed is None:
        pytest.skip("the lpips wheel is not installed (make setup installs it)")
    check = verify_checkpoint("lpips_heads", installed, LPIPS_HEADS)
    assert check.verified and check.sha256 == LPIPS_HEADS.sha256 and check.problem() == ""


def _hub_cache(root: Path, model: str, weights: bytes, blob_name: str | None = None) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: snapshots/<rev>/file -> blobs/<sha256>."""
    repo = root / ("models--" + model.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    blob = blobs / (blob_name or hashlib.sha256(weights).hexdigest())
    blob.write_bytes(weights)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / blob.name)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_a_hub_folder_is_checked_against_the_hubs_hash_and_a_copied_folder_is_unverified(tmp_path: Path) -> None:
    good = _hub_cache(tmp_path / "hub", "openai/clip-vit-large-patch14", b"published bytes")
    (check,) = verify_folder("clip", good)
    assert check.verified and check.source == HUB_SOURCE
    # A blob whose bytes are not what its name (the Hub's hash) says: damaged or replaced.
    bad = _hub_cache(tmp_path / "hub2", "openai/clip-vit-large-patch14", b"other bytes", blob_name="ab" * 32)
    (check,) = verify_folder("clip", bad)
    assert not check.verified and check.expected == "ab" * 32
    # The same files copied out of the cache have no published hash to be checked against.
    copied = tmp_path / "copied"
    shutil.copytree(good, copied, symlinks=False)
    (check,) = verify_folder("clip", copied)
    assert not check.verified and check.expected is None and "not read from the Hugging Face cache" in check.problem()


def test_a_random_clip_under_the_published_name_is_refused_unless_allowed(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    write_clip(weights / "clip-vit-large-patch14")
    store = WeightStore(weights)
    (check, *_) = [c for c in store.audit("openai/clip-vit-large-patch14", "facebook/dino-vits16") if c.role == "clip"]
    assert not check.verified and check.file == str(weights / "clip-vit-large-patch14" / "model.safetensors")
    suite = MetricSuite(store, clip_model="openai/clip-vit-large-patch14")
    refusal = re.escape("clip-vit-large-patch14/model.safetensors (clip) cannot be verified")
    with pytest.raises(UnverifiedWeights, match=refusal):
        suite.clip_image_embeddings(torch.zeros(1, 3, 32, 32))
    allowed = MetricSuite(store, clip_model="openai/clip-vit-large-patch14", allow_unverified=True)
    allowed.clip_image_embeddings(torch.zeros(1, 3, 32, 32))
    assert allowed.loaded["clip"]["verified"] is False and allowed.loaded["clip"]["problems"]
