"""The written-out networks have the published architectures and refuse a checkpoint that does not fit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ham_engine.evaluation.inception import FEATURES, FidInceptionV3
from ham_engine.evaluation.networks import AlexNetTrunk, LpipsAlex, Vgg16Trunk, load_weights
from ham_engine.evaluation.weights import LPIPS_HEADS, VGG16, WeightStore, WeightsUnavailable


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_fid_inception_has_torchvisions_inception_v3_without_its_heads() -> None:
    network = FidInceptionV3()
    # torchvision's inception_v3: 27,161,264 parameters, of which AuxLogits 3,326,696 and fc 2,049,000.
    assert _parameters(network) == 27_161_264 - 3_326_696 - 2_049_000
    state = network.state_dict()
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    with torch.inference_mode():
        features = network.eval()(torch.rand(2, 3, 80, 120))
    assert features.shape == (2, FEATURES)


def test_trunks_have_torchvisions_parameter_names_and_counts() -> None:
    assert _parameters(AlexNetTrunk()) == 2_469_696  # torchvision alexnet().features
    assert [k for k in AlexNetTrunk().state_dict() if k.endswith("weight")] == [
        f"features.{i}.weight" for i in (0, 3, 6, 8, 10)
    ]
    vgg = Vgg16Trunk()
    assert [k for k in vgg.state_dict() if k.endswith("weight")] == [
        f"features.{i}.weight" for i in (0, 2, 5, 7, 10, 12, 14)
    ]
    with torch.inference_mode():
        assert vgg(torch.rand(1, 3, 64, 48)).shape == (1, 256, 16, 12)  # relu3_3: a quarter of the size


def test_a_checkpoint_that_does_not_fit_is_refused_by_name() -> None:
    state = AlexNetTrunk().state_dict()
    del state["features.10.bias"]
    with pytest.raises(ValueError, match=r"alexnet\.pth does not match.*missing features\.10\.bias"):
        load_weights(AlexNetTrunk(), state, what="alexnet.pth")
    state = AlexNetTrunk().state_dict()
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError, match=r"wrong shape for features\.0\.weight"):
        load_weights(AlexNetTrunk(), state)
    state = {**AlexNetTrunk().state_dict(), "classifier.1.weight": torch.zeros(2, 2), "surprise": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected surprise"):
        load_weights(AlexNetTrunk(), state, ignore=("classifier.",))


def test_lpips_heads_round_trip_in_lpips_own_layout() -> None:
    source = LpipsAlex()
    for head in source.heads:
        head.data.copy_(torch.rand_like(head))
    state = source.head_state()
    assert state["lin0.model.1.weight"].shape == (1, 64, 1, 1)
    target = LpipsAlex()
    target.load_heads(state)
    assert all(torch.equal(a, b) for a, b in zip(source.heads, target.heads, strict=True))
    with pytest.raises(ValueError, match=r"lin4\.model\.1\.weight"):
        target.load_heads({k: v for k, v in state.items() if not k.startswith("lin4")})


def test_missing_weights_say_what_to_put_where(tmp_path: Path, hermetic_caches: Path) -> None:
    store = WeightStore(tmp_path)
    with pytest.raises(WeightsUnavailable, match=rf"put vgg16-397923af\.pth .* into {tmp_path}/ or .*torch-home"):
        store.checkpoint(VGG16)
    with pytest.raises(WeightsUnavailable, match=rf"nobody/clip-x .* at {tmp_path}/clip-x"):
        store.pretrained_folder("nobody/clip-x", "CLIP")
    with pytest.raises(ValueError, match="weights: folder"):
        WeightStore(tmp_path / "absent")


def test_weights_are_found_in_the_folder_then_in_torchs_cache(tmp_path: Path, hermetic_caches: Path) -> None:
    checkpoints = hermetic_caches / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / LPIPS_HEADS.filename).write_bytes(b"cached")
    assert WeightStore(None).find(LPIPS_HEADS) == checkpoints / LPIPS_HEADS.filename
    given = tmp_path / "given"
    (given / "lpips").mkdir(parents=True)
    (given / "lpips" / LPIPS_HEADS.filename).write_bytes(b"given")
    assert WeightStore(given).find(LPIPS_HEADS) == given / "lpips" / LPIPS_HEADS.filename


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="lpips (make setup installs it --no-deps) absent")
def test_the_published_lpips_heads_load_from_the_installed_lpips_package(hermetic_caches: Path) -> None:
    # make setup installs lpips --no-deps for its 6 kB of linear heads: the real published weights.
    path = WeightStore(None).find(LPIPS_HEADS)
    assert path is not None and path.parts[-4:] == ("lpips", "weights", "v0.1", "alex.pth")
    network = LpipsAlex()
    network.load_heads(torch.load(path, map_location="cpu", weights_only=True))
    assert all((head >= 0).all() and head.sum() > 1 for head in network.heads)  # learnt, non-negative


_REFERENCE_LPIPS = """
import sys, types, torch
from ham_engine.evaluation.networks import LpipsAlex
from ham_engine.evaluation import metrics

torch.manual_seed(0)
ours = LpipsAlex().eval()
# The reference code asks torchvision for AlexNet's layers and scipy for an unused import: hand it
# our layers (the same tensors both sides), so only the LPIPS arithmetic differs between the two.
torchvision = types.ModuleType("torchvision")
torchvision.models = types.SimpleNamespace(alexnet=lambda pretrained: types.SimpleNamespace(
    features=ours.trunk.features))
scipy, ndimage = types.ModuleType("scipy"), types.ModuleType("scipy.ndimage")
ndimage.zoom = None
sys.modules.update({"torchvision": torchvision, "scipy": scipy, "scipy.ndimage": ndimage})
import lpips

reference = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
ours.load_heads(torch.load(lpips.__path__[0] + "/weights/v0.1/alex.pth", map_location="cpu"))
x, y = torch.rand(3, 3, 64, 96) * 2 - 1, torch.rand(3, 3, 64, 96) * 2 - 1
with torch.inference_mode():
    expected = reference(x, y).flatten()
    got = metrics.lpips_distance(ours.features(x), ours.features(y), list(ours.heads))
print(" ".join(f"{v:.9f}" for v in expected.tolist()))
print(" ".join(f"{v:.9f}" for v in got.tolist()))
"""


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="lpips (make setup installs it --no-deps) absent")
def test_lpips_equals_the_reference_lpips_code_with_its_published_heads() -> None:
    # In a child process: the reference package is imported with stand-ins for its imports.
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _REFERENCE_LPIPS], capture_output=True, text=True, cwd=repo,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    expected, got = ([float(v) for v in line.split()] for line in done.stdout.strip().splitlines()[-2:])
    assert len(expected) == 3 and all(v > 0 for v in expected)
    assert got == pytest.approx(expected, rel=1e-5)


_REFERENCE_FID_INCEPTION = """
import sys, types, torch
from torch import nn
from ham_engine.evaluation import inception as ours
from ham_engine.evaluation.networks import load_weights

# pytorch-fid builds its network from torchvision's Inception blocks, then overrides the
# FID-specific parts (pooling, the last block, the block order, resize and scaling). Hand it
# our blocks as torchvision's: what is compared is its FID network against ours.
class InceptionE(ours.InceptionE):
    def __init__(self, in_channels):
        super().__init__(in_channels, max_pool=False)

def inception_v3(**kwargs):
    model = ours.FidInceptionV3()
    model.fc = nn.Linear(2048, 1008)
    return model

torchvision = types.ModuleType("torchvision")
torchvision.__version__ = "0.21.0"
torchvision.models = types.SimpleNamespace(inception_v3=inception_v3, inception=types.SimpleNamespace(
    InceptionA=ours.InceptionA, InceptionC=ours.InceptionC, InceptionE=InceptionE))
sys.modules["torchvision"] = torchvision
import pytorch_fid.inception as reference_module

torch.manual_seed(0)
source = inception_v3()
for module in source.modules():
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):  # non-trivial statistics, so that BN's use is compared too
        module.weight.data.uniform_(0.5, 1.5)
        module.bias.data.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
state = source.state_dict()
reference_module.load_state_dict_from_url = lambda url, progress=True: state
reference = reference_module.InceptionV3([3]).eval()
network = ours.FidInceptionV3()
load_weights(network, state, ignore=("fc.",))
network.eval()
x = torch.rand(2, 3, 96, 160)
with torch.inference_mode():
    expected, got = reference(x)[0].flatten(1), network(x)
print(float(expected.abs().mean()), float((expected - got).abs().max()))
"""


@pytest.mark.skipif(importlib.util.find_spec("pytorch_fid") is None,
                    reason="pytorch-fid (make setup installs it --no-deps) absent")
def test_fid_inception_equals_pytorch_fids_network() -> None:
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _REFERENCE_FID_INCEPTION], capture_output=True, text=True,
                          cwd=repo, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    scale, difference = (float(v) for v in done.stdout.split()[-2:])
    assert scale > 0.01  # live activations, not a vanished signal
    assert difference <= 1e-5 * max(scale, 1.0)
