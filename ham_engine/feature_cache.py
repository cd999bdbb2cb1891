"""What repeat inputs let a transfer skip, and a byte-bounded LRU of it, the feature cache (docs/method.md §7).

An image style teacher is re-anchored to its inverted trajectory, so everything it feeds
the student is fixed by the style image, the size, the schedule, the layers and its text
conditioning: per GAR layer and step the per-channel mean/std of its Q, K, V; per LAT
layer its cross-attention K/V; and for SINI the statistics of its terminal latent z_T^s.
A repeat style therefore needs neither the style inversion nor the style branch in the
sampling batch. Likewise a content image's DDIM inversion is fixed by the image, the size,
the schedule and the model: a repeat content skips it (:class:`ContentTrajectory`).
Tensors stay on the model's device, so the byte budget is device memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

# Per-channel (mean, std) over tokens of Q, K and V side by side: each [halves, 1, 3C] float32.
QkvStats = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StyleKey:
    """Everything a style teacher's features depend on (besides the model weights)."""

    model: str
    image_digest: str
    size: tuple[int, int]
    steps: int
    gar_layers: tuple[str, ...]  # resolved module names; empty when GAR is off
    lat_layers: tuple[str, ...]  # resolved module names; empty when LAT is off
    step_window: tuple[float, float]
    style_prompt: str | None
    dtype: str
    device: str
    inversion: str = "target"  # the convention fixes the style's trajectory, so its features


@dataclass
class StyleFeatures:
    """A style teacher's contribution to the student over one whole sampling run.

    ``gar`` maps (step, layer) to the statistics of [Q | K | V]; ``lat`` maps a layer to its
    (K, V) cross-attention projections, which depend only on the text conditioning and so
    are stored once per layer.
    """

    terminal_mean: torch.Tensor | None = None  # [1, C, 1, 1] float32, of z_T^s
    terminal_std: torch.Tensor | None = None
    gar: dict[tuple[int, str], QkvStats] = field(default_factory=dict)
    lat: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for byte accounting)."""
        out = [t for t in (self.terminal_mean, self.terminal_std) if t is not None]
        for mean, std in self.gar.values():
            out += [mean, std]
        for key, value in self.lat.values():
            out += [key, value]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass(frozen=True)
class ContentKey:
    """Everything a content image's inversion depends on (besides the model weights)."""

    model: str
    image_digest: str
    size: tuple[int, int]
    steps: int
    dtype: str
    device: str
    inversion: str = "target"  # the convention fixes the trajectory (docs/method.md)


@dataclass
class ContentTrajectory:
    """A content image's DDIM inversion: entry ``k`` is the latent sampling step ``k`` starts from."""

    latents: list[torch.Tensor]  # each [1, C, h, w] float32; entry 0 is z_T^c

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held."""
        return sum(t.numel() * t.element_size() for t in self.latents)


class FeatureCache:
    """A least-recently-used map of keys to features (values with ``nbytes``), bounded in bytes.

    The engine keeps two, tier 1 of :mod:`ham_engine.feature_tiers`: its style cache,
    :class:`StyleKey` → :class:`StyleFeatures`, and its content cache, :class:`ContentKey`
    → :class:`ContentTrajectory`. ``field`` names the setting that sized it, for errors.

    ``put`` evicts the least recently used entries until the new one fits; an entry larger
    than ``max_bytes`` on its own is not stored (``max_bytes=0`` disables the cache).
    Thread-safe.
    """

    def __init__(self, max_bytes: int, field: str) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"{field}: must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: Any) -> Any:
        """The entry for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Any, value: Any) -> bool:
        """Store ``value`` under ``key``, evicting LRU entries to fit; False if it is too large to keep."""
        size = value.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._nbytes -= old[1]
            if size > self.max_bytes:
                return False
            while self._nbytes + size > self.max_bytes:
                _, (_, evicted_size) = self._entries.popitem(last=False)
                self._nbytes -= evicted_size
                self.evictions += 1
            self._entries[key] = (value, size)
            self._nbytes += size
            return True

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0
