"""Style features and content trajectories as byte blobs (safetensors with a checked header).

What a repeat input lets the engine skip is fixed by the input, the request and the
model's weights (:mod:`ham_engine.feature_cache`). To share it between processes and
machines each value becomes one safetensors blob whose metadata names what it was
computed for:

- ``format``/``version``: this module's layout (:data:`FORMAT_VERSION`);
- ``kind``: ``style`` (:class:`StyleFeatures`) or ``content`` (:class:`ContentTrajectory`);
- ``fingerprint``: :func:`model_fingerprint`, a hash of the configs *and weights* of the
  UNet, VAE and text encoder (a model name says nothing about the weights behind it);
- everything else the value depends on: model name, dtype, size, steps, layers, step
  window, style prompt, the input image's digest;
- ``checksum``: a BLAKE2b hash of every tensor's name, dtype, shape and bytes.

:func:`decode_style` and :func:`decode_content` return None for a blob that is not
exactly what was asked for — another version, another model, another request, a
corrupt or truncated file, a missing or misshapen tensor — so a stale or damaged blob
costs a recomputation, never a crash or a wrong picture. Blobs hold CPU float32 tensors;
decoding moves them to the model's device.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ham_engine.feature_cache import ContentKey, ContentTrajectory, StyleFeatures, StyleKey
from ham_engine.feature_store import content_prefix, style_prefix

FORMAT = "ham-features"
FORMAT_VERSION = 1

Header = dict[str, str]


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """BLAKE2b hex of the modules' class names, configs and every parameter and buffer.

    Two models with the same architecture and different weights get different
    fingerprints. Reads every tensor once (about a second per GB on a CPU).
    """
    digest = hashlib.blake2b(digest_size=20)
    for module in modules:
        digest.update(type(module).__name__.encode())
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config if isinstance(config, Mapping) else config.to_dict()
            digest.update(json.dumps(dict(as_dict), sort_keys=True, default=str).encode())
        for name, tensor in module.state_dict().items():
            _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def style_header(key: StyleKey, fingerprint: str) -> Header:
    """What a style blob for ``key`` must say about itself."""
    return {
        **_common(key.model, key.dtype, key.size, key.steps, key.image_digest, fingerprint),
        "kind": "style",
        "gar_layers": json.dumps(list(key.gar_layers)),
        "lat_layers": json.dumps(list(key.lat_layers)),
        "step_window": json.dumps(list(key.step_window)),
        "style_prompt": json.dumps(key.style_prompt),
        "inversion": key.inversion,
    }


def content_header(key: ContentKey, fingerprint: str) -> Header:
    """What a content-trajectory blob for ``key`` must say about itself."""
    common = _common(key.model, key.dtype, key.size, key.steps, key.image_digest, fingerprint)
    return {**common, "kind": "content", "inversion": key.inversion}


def store_key(header: Header) -> str:
    """Where a blob with ``header`` lives in a feature store: ``{kind}/{image digest}/{hash}.safetensors``.

    The hash covers the request (model name, dtype, size, steps, layers, window, prompt)
    but not the format version or the weights fingerprint: a blob written by another
    version or for other weights under the same model name sits where the current one
    would, is refused on reading, and is overwritten by the recomputed value.
    """
    request = {k: v for k, v in header.items() if k not in ("format", "version", "fingerprint", "checksum")}
    digest = hashlib.blake2b(json.dumps(request, sort_keys=True).encode(), digest_size=16).hexdigest()
    prefix = style_prefix if header["kind"] == "style" else content_prefix
    return f"{prefix(header['image_digest'])}{digest}.safetensors"


def encode_style(features: StyleFeatures, header: Header) -> bytes:
    """``features`` as a safetensors blob carrying ``header``."""
    tensors: dict[str, torch.Tensor] = {}
    if features.terminal_mean is not None and features.terminal_std is not None:
        tensors["terminal.mean"] = features.terminal_mean
        tensors["terminal.std"] = features.terminal_std
    for (step, layer), (mean, std) in features.gar.items():
        tensors[f"gar.{step}.{layer}.mean"] = mean
        tensors[f"gar.{step}.{layer}.std"] = std
    for layer, (key, value) in features.lat.items():
        tensors[f"lat.{layer}.key"] = key
        tensors[f"lat.{layer}.value"] = value
    return _encode(tensors, header)


def decode_style(
    blob: bytes | None,
    header: Header,
    gar_entries: set[tuple[int, str]],
    lat_layers: set[str],
    device: torch.device,
) -> StyleFeatures | None:
    """The features in ``blob`` if it is a sound blob for exactly ``header``, else None.

    ``gar_entries`` ((step, layer) pairs) and ``lat_layers`` are what a transfer will
    read; a blob missing any of them is refused.
    """
    tensors = _decode(blob, header)
    if tensors is None:
        return None
    features = StyleFeatures()
    if "terminal.mean" in tensors and "terminal.std" in tensors:
        features.terminal_mean = tensors.pop("terminal.mean").to(device)
        features.terminal_std = tensors.pop("terminal.std").to(device)
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "gar" and rest.endswith(".mean"):
            step, _, layer = rest.removesuffix(".mean").partition(".")
            std = tensors.get(f"gar.{step}.{layer}.std")
            if not step.isdigit() or std is None or std.shape != tensor.shape:
                return None
            features.gar[(int(step), layer)] = (tensor.to(device), std.to(device))
        elif kind == "lat" and rest.endswith(".key"):
            layer = rest.removesuffix(".key")
            value = tensors.get(f"lat.{layer}.value")
            if value is None:
                return None
            features.lat[layer] = (tensor.to(device), value.to(device))
    if not gar_entries <= features.gar.keys() or not lat_layers <= features.lat.keys():
        return None
    return features


def encode_content(trajectory: ContentTrajectory, header: Header) -> bytes:
    """A content trajectory (the latent each sampling step starts from) as a blob carrying ``header``."""
    return _encode({f"z.{k}": z for k, z in enumerate(trajectory.latents)}, header)


def decode_content(
    blob: bytes | None, header: Header, shape: tuple[int, ...], device: torch.device
) -> ContentTrajectory | None:
    """The trajectory in ``blob`` if it is a sound blob for ``header`` with ``steps`` latents of ``shape``."""
    tensors = _decode(blob, header)
    if tensors is None:
        return None
    steps = int(header["steps"])
    names = [f"z.{k}" for k in range(steps)]
    if set(tensors) != set(names) or any(tuple(tensors[n].shape) != shape for n in names):
        return None
    return ContentTrajectory([tensors[n].to(device) for n in names])


# -- the blob ---------------------------------------------------------------------------


def _common(model: str, dtype: str, size: tuple[int, int], steps: int, image_digest: str, fingerprint: str) -> Header:
    return {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "fingerprint": fingerprint,
        "model": model,
        "dtype": dtype,
        "size": f"{size[0]}x{size[1]}",
        "steps": str(steps),
        "image_digest": image_digest,
    }


def _encode(tensors: dict[str, torch.Tensor], header: Header) -> bytes:
    cpu = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    return save_safetensors(cpu, metadata={**header, "checksum": _checksum(cpu)})


def _decode(blob: bytes | None, header: Header) -> dict[str, torch.Tensor] | None:
    if not blob:
        return None
    try:
        tensors = load_safetensors(blob)
        metadata = _metadata(blob)
    except Exception:  # truncated, corrupt, not safetensors at all
        return None
    checksum = metadata.pop("checksum", None)
    if metadata != header or checksum != _checksum(tensors):
        return None
    if any(t.dtype != torch.float32 or not torch.isfinite(t).all() for t in tensors.values()):
        return None
    return tensors


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors' layout: an 8-byte little-endian header length, then the JSON header.
    length = int.from_bytes(blob[:8], "little")
    parsed: dict[str, Any] = json.loads(blob[8 : 8 + length])
    metadata = parsed.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    if tensor.numel():
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
