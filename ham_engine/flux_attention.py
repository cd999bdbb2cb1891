"""HAM in FLUX.1's attention: double-stream blocks (as SD3's joint attention) and single-stream blocks.

FLUX attends over the joint sequence [text tokens | image tokens] (text first, unlike
SD3) with rotary position embeddings. A *double-stream* block projects the image stream
with ``to_q/to_k/to_v`` and the text stream with ``add_*_proj``, like SD3; a
*single-stream* block has already concatenated the two streams and projects the whole
sequence with ``to_q/to_k/to_v``, so its image and text parts are the rows after and
before the text length. HAM acts on the same parts in both (docs/method.md, "FLUX"):
GAR on the image tokens' Q/K/V, LAT on the text tokens' K/V and the image query — the
hooks of :mod:`ham_engine.joint_attention`.

:class:`HookedFluxProcessor` is diffusers' ``FluxAttnProcessor`` line for line plus one
hook between the projections and the head split; a hook that returns its inputs gives
the stock result bit for bit. FLUX's attention modules are ``FluxAttention``, not
``Attention``, so :func:`installed_flux_processors` installs and restores them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, ModulationContext
from ham_engine.joint_attention import HamHook, Projections, RecordHook
from ham_engine.recording import TeacherRecording

TextTokens = Callable[[], int]  # the text length of the call in progress (the denoiser knows it)


def flux_layers(transformer: torch.nn.Module, kind: str) -> list[str]:
    """FLUX's attention modules, double-stream then single-stream; every one carries both parts (GAR and LAT)."""
    if kind not in (SELF_ATTENTION, CROSS_ATTENTION):
        raise ValueError(f"kind: {kind!r} is not {SELF_ATTENTION!r} (self) or {CROSS_ATTENTION!r} (cross)")
    return [name for name, module in transformer.named_modules() if type(module).__name__ == "FluxAttention"]


class HookedFluxProcessor:
    """``FluxAttnProcessor`` with one hook on the image and text projections.

    ``text_tokens()`` gives the text length of the current call: a single-stream block's
    first that many rows are the text part. The stock arithmetic is unchanged; in a
    single-stream block the hook sees views of the two parts and writes through them.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, text_tokens: TextTokens) -> None:
        self.text_tokens = text_tokens

    def hook(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        image: Projections,
        text: Projections | None,
    ) -> tuple[Projections, Projections | None]:
        """See the image (and text) Q, K, V ``[B, L, inner]``; return those to attend with."""
        raise NotImplementedError

    def _hooked(
        self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        if attn.added_kv_proj_dim is not None:  # double stream: the two streams projected apart
            text = (encoder_query, encoder_key, encoder_value) if encoder_hidden_states is not None else None
            (query, key, value), text = self.hook(attn, hidden_states, (query, key, value), text)
            if text is not None:
                encoder_query, encoder_key, encoder_value = text
            return query, key, value, encoder_query, encoder_key, encoder_value
        # Single stream: [text | image] projected together; the hook writes through the views.
        split = self.text_tokens()
        image = (query[:, split:], key[:, split:], value[:, split:])
        text = (query[:, :split], key[:, :split], value[:, :split])
        new_image, new_text = self.hook(attn, hidden_states[:, split:], image, text)
        assert new_text is not None
        if any(a is not b for a, b in zip((*new_image, *new_text), (*image, *text), strict=True)):
            query, key, value = (torch.cat([t, i], dim=1) for t, i in zip(new_text, new_image, strict=True))
        return query, key, value, encoder_query, encoder_key, encoder_value

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The only departure from the stock processor: a hook sees (and may rewrite) the projections.
        query, key, value, encoder_query, encoder_key, encoder_value = self._hooked(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class FluxHamProcessor(HamHook, HookedFluxProcessor):
    """HAM on a FLUX attention layer (:class:`~ham_engine.joint_attention.HamHook` in FLUX's mechanics)."""

    def __init__(
        self, layer: str, context: ModulationContext, gar: bool, lat: bool, text_tokens: TextTokens
    ) -> None:
        HamHook.__init__(self, layer, context, gar, lat)
        HookedFluxProcessor.__init__(self, text_tokens)


class FluxRecorder(RecordHook, HookedFluxProcessor):
    """The inversion recorder on a FLUX attention layer."""

    def __init__(
        self, layer: str, recording: TeacherRecording, gar: bool, lat: bool, text_tokens: TextTokens
    ) -> None:
        RecordHook.__init__(self, layer, recording, gar, lat)
        HookedFluxProcessor.__init__(self, text_tokens)


@contextmanager
def installed_flux_processors(transformer: torch.nn.Module, processors: dict[str, object]) -> Iterator[None]:
    """Set ``processors`` (FLUX attention name → processor) for the block, then put the originals back."""
    modules = dict(transformer.named_modules())
    originals: dict[str, object] = {}
    try:
        for name, processor in processors.items():
            module = modules.get(name)
            if module is None or type(module).__name__ != "FluxAttention":
                raise ValueError(f"{name!r} is not an attention module of this FLUX transformer")
            originals[name] = module.processor
            module.set_processor(processor)
        yield
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
