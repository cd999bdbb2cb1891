"""The feature cache: a byte-bounded LRU of style-teacher features (and content trajectories)."""

from __future__ import annotations

import pytest
import torch

from ham_engine.feature_cache import FeatureCache, StyleFeatures, StyleKey


def _key(digest: str) -> StyleKey:
    return StyleKey(
        model="tiny",
        image_digest=digest,
        size=(64, 64),
        steps=4,
        gar_layers=("up_blocks.0.attentions.0.transformer_blocks.0.attn1",),
        lat_layers=(),
        step_window=(0.0, 1.0),
        style_prompt=None,
        dtype="torch.float32",
        device="cpu",
    )


def _features(floats: int) -> StyleFeatures:
    """Features holding exactly ``floats`` float32 values (4 bytes each)."""
    half = floats // 2
    return StyleFeatures(terminal_mean=torch.zeros(half), terminal_std=torch.zeros(floats - half))


def test_features_count_the_bytes_of_every_tensor() -> None:
    features = StyleFeatures(
        terminal_mean=torch.zeros(1, 4, 1, 1),
        terminal_std=torch.ones(1, 4, 1, 1),
        gar={(0, "a"): (torch.zeros(1, 1, 24), torch.ones(1, 1, 24)), (1, "a"): (torch.zeros(24), torch.ones(24))},
        lat={"b": (torch.zeros(1, 77, 8, dtype=torch.float16), torch.zeros(1, 77, 8, dtype=torch.float16))},
    )
    assert features.nbytes == 4 * 4 * 2 + 4 * 24 * 4 + 2 * 77 * 8 * 2


def test_get_returns_what_put_stored_and_counts_hits_and_misses() -> None:
    cache = FeatureCache(max_bytes=1000, field="style_cache_bytes")
    value = _features(10)
    assert cache.get(_key("a")) is None
    assert cache.put(_key("a"), value)
    assert cache.get(_key("a")) is value
    assert (cache.hits, cache.misses, len(cache), cache.nbytes) == (1, 1, 1, 40)


def test_put_evicts_least_recently_used_entries_to_stay_within_the_byte_limit() -> None:
    cache = FeatureCache(max_bytes=100, field="style_cache_bytes")  # room for two entries of 40 bytes
    cache.put(_key("a"), _features(10))
    cache.put(_key("b"), _features(10))
    cache.get(_key("a"))  # "b" is now the least recently used
    cache.put(_key("c"), _features(10))
    assert _key("a") in cache and _key("c") in cache and _key("b") not in cache
    assert cache.nbytes == 80 <= cache.max_bytes
    assert cache.evictions == 1


def test_entry_larger_than_the_limit_is_not_stored_and_evicts_nothing() -> None:
    cache = FeatureCache(max_bytes=100, field="style_cache_bytes")
    cache.put(_key("a"), _features(10))
    assert not cache.put(_key("big"), _features(26))
    assert _key("big") not in cache and _key("a") in cache
    assert cache.nbytes == 40


def test_replacing_an_entry_updates_the_byte_count() -> None:
    cache = FeatureCache(max_bytes=100, field="style_cache_bytes")
    cache.put(_key("a"), _features(10))
    cache.put(_key("a"), _features(20))
    assert (len(cache), cache.nbytes) == (1, 80)


def test_zero_bytes_disables_the_cache() -> None:
    cache = FeatureCache(max_bytes=0, field="style_cache_bytes")
    assert not cache.put(_key("a"), _features(1))
    assert len(cache) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_bad_byte_limit_is_a_value_error_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match="style_cache_bytes"):
        FeatureCache(max_bytes=bad, field="style_cache_bytes")  # type: ignore[arg-type]
