"""Two tiers of repeat-input features: the in-process LRU first, then a shared feature store.

A lookup asks memory, then the store (checking the blob against the exact request and
the model's weights fingerprint); a store hit is promoted to memory. What the cold path
computed goes to both. The store is best effort: an error reading or writing it is
logged and costs a recomputation, never a transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ham_engine import features
from ham_engine.feature_cache import ContentKey, ContentTrajectory, FeatureCache, StyleFeatures, StyleKey
from ham_engine.feature_store import FeatureStore
from ham_engine.loading import DiffusionModel

log = logging.getLogger("ham.engine")

MEMORY = "memory"
STORE = "store"


@dataclass
class StoreCounters:
    """What the store tier did in this engine's lifetime (for metrics)."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0  # a blob was there but not usable (stale, other model, damaged)
    writes: int = 0
    bytes_written: int = 0
    errors: int = 0


class FeatureTiers:
    """Style features and content trajectories, looked up memory first, then ``store``."""

    def __init__(
        self,
        model: DiffusionModel,
        styles: FeatureCache,
        contents: FeatureCache,
        store: FeatureStore | None = None,
    ) -> None:
        self.model = model
        self.styles = styles
        self.contents = contents
        self.store = store
        self.counters = StoreCounters()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The model's weights fingerprint, computed on first use (it reads every weight once)."""
        if self._fingerprint is None:
            m = self.model
            self._fingerprint = features.model_fingerprint(m.unet, m.vae, m.text_encoder)
        return self._fingerprint

    def style(
        self, key: StyleKey, gar_entries: set[tuple[int, str]], lat_layers: set[str]
    ) -> tuple[StyleFeatures | None, str | None]:
        """(features, the tier that had them) or (None, None)."""
        found = self.styles.get(key)
        if found is not None:
            return found, MEMORY
        if self.store is None:
            return None, None
        header = features.style_header(key, self.fingerprint)
        blob = self._read(header)
        found = features.decode_style(blob, header, gar_entries, lat_layers, self.model.device)
        return self._promote(self.styles, key, found, blob)

    def content(self, key: ContentKey, shape: tuple[int, ...]) -> tuple[ContentTrajectory | None, str | None]:
        """(trajectory, the tier that had it) or (None, None)."""
        found = self.contents.get(key)
        if found is not None:
            return found, MEMORY
        if self.store is None:
            return None, None
        header = features.content_header(key, self.fingerprint)
        blob = self._read(header)
        found = features.decode_content(blob, header, shape, self.model.device)
        return self._promote(self.contents, key, found, blob)

    def put_style(self, key: StyleKey, value: StyleFeatures) -> None:
        """Keep what a cold style computed, in memory and in the store."""
        self.styles.put(key, value)
        if self.store is not None:
            header = features.style_header(key, self.fingerprint)
            self._write(header, features.encode_style(value, header))

    def put_content(self, key: ContentKey, value: ContentTrajectory) -> None:
        """Keep a content inversion, in memory and in the store."""
        self.contents.put(key, value)
        if self.store is not None:
            header = features.content_header(key, self.fingerprint)
            self._write(header, features.encode_content(value, header))

    def _promote(
        self, cache: FeatureCache, key: StyleKey | ContentKey, found: Any, blob: bytes | None
    ) -> tuple[Any, str | None]:
        if found is None:
            self.counters.misses += 1
            if blob:
                self.counters.rejected += 1
                log.info("feature store: ignored an unusable blob for %s (stale, other model or damaged)", key)
            return None, None
        self.counters.hits += 1
        cache.put(key, found)
        return found, STORE

    def _read(self, header: features.Header) -> bytes | None:
        try:
            return self.store.get(features.store_key(header))
        except Exception:
            self.counters.errors += 1
            log.warning("feature store: read failed; computing instead", exc_info=True)
            return None

    def _write(self, header: features.Header, blob: bytes) -> None:
        try:
            self.store.put(features.store_key(header), blob)
        except Exception:
            self.counters.errors += 1
            log.warning("feature store: write failed; the features stay in memory only", exc_info=True)
            return
        self.counters.writes += 1
        self.counters.bytes_written += len(blob)


def latent_shape(model: DiffusionModel, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The shape of one latent for an output of ``size`` (width, height)."""
    width, height = size
    scale = model.vae_scale_factor
    return (1, model.unet.config.in_channels, height // scale, width // scale)
