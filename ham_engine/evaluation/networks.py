"""The small convolutional trunks the metrics need, written out so published weights load as they are.

``lpips`` and torchvision build these from ``torchvision.models``, and torchvision from
PyPI would replace our pinned torch. The definitions here keep torchvision's module
names (``features.0.weight``, ...), so torchvision's own checkpoints load unchanged:

- :class:`AlexNetTrunk` — ``alexnet-owt-7be5be79.pth``, LPIPS's default trunk, with the
  LPIPS v0.1 linear heads (``alex.pth``, shipped inside the ``lpips`` wheel);
- :class:`Vgg16Trunk` — ``vgg16-397923af.pth``, whose ``relu3_3`` features CFSD compares.

The Inception network of FID is in :mod:`.inception`. CLIP and DINO come from
``transformers`` (:mod:`.suite`), which is already a dependency of the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# LPIPS v0.1's ScalingLayer: inputs in [−1, 1] are shifted and scaled to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_weights(
    module: nn.Module, state: Mapping[str, torch.Tensor], ignore: Iterable[str] = (), what: str = ""
) -> None:
    """Load ``state`` into ``module``; every tensor the module has must be there with its shape.

    Keys under an ``ignore`` prefix (a classifier head the features never reach) may be
    present or not; any other unexpected key, a missing key or a wrong shape is a
    ``ValueError`` naming the file's role (``what``): a mislabelled checkpoint is refused
    rather than half-loaded.
    """
    ignore = tuple(ignore)
    own = module.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    counter = "num_batches_tracked"  # BatchNorm's step counter: present in some checkpoints, unused in eval
    missing = [k for k in own if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore) and not k.endswith(counter)]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            details.append(f"wrong shape for {', '.join(wrong[:3])}")
        raise ValueError(f"weights: {what or type(module).__name__} does not match the network ({'; '.join(details)})")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


class AlexNetTrunk(nn.Module):
    """torchvision's AlexNet ``features``, returning LPIPS's five ReLU outputs (relu1..relu5)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        # LPIPS's slices end after these ReLUs.
        self._taps = (1, 4, 7, 9, 11)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                outputs.append(x)
        return outputs


class LpipsAlex(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk: per-layer features of images in [−1, 1], plus the linear heads.

    ``heads`` are the five 1×1 convolutions' weights (``lin{l}.model.1.weight`` in LPIPS's
    ``alex.pth``) flattened to one weight per channel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trunk = AlexNetTrunk()
        self.heads = nn.ParameterList([nn.Parameter(torch.zeros(c), requires_grad=False) for c in ALEXNET_CHANNELS])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1), persistent=False)

    def load_heads(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load LPIPS's ``alex.pth`` (keys ``lin0.model.1.weight`` .. ``lin4.model.1.weight``, [1, C, 1, 1])."""
        for layer, channels in enumerate(ALEXNET_CHANNELS):
            key = f"lin{layer}.model.1.weight"
            if key not in state or state[key].numel() != channels:
                raise ValueError(f"weights: LPIPS heads need {key} with {channels} values (is this LPIPS's alex.pth?)")
            self.heads[layer].data.copy_(state[key].reshape(-1))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The heads in LPIPS's own ``alex.pth`` layout (for writing a checkpoint)."""
        return {f"lin{i}.model.1.weight": h.detach().reshape(1, -1, 1, 1).clone() for i, h in enumerate(self.heads)}

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The trunk's five ReLU outputs for images [B, 3, H, W] in [−1, 1]."""
        return self.trunk((images - self.shift) / self.scale)


class Vgg16Trunk(nn.Module):
    """torchvision's VGG-16 ``features`` up to ``relu3_3``: images in [0, 1] → [B, 256, H/4, W/4]."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in (64, 64, "M", 128, 128, "M", 256, 256, 256):
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features((images - self.mean) / self.std)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B, C, H, W] to (height, width), antialiased when shrinking."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
