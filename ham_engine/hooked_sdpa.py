"""diffusers' stock ``AttnProcessor2_0`` with one hook on the Q/K/V projections.

HAM's processors (:mod:`ham_engine.attention`, :mod:`ham_engine.recording`) subclass
:class:`HookedSdpaProcessor` and override only :meth:`~HookedSdpaProcessor.hook`. Its
``__call__`` is a copy of the installed diffusers' ``AttnProcessor2_0.__call__`` with the
hook call added (and the deprecated ``scale`` warning and the comments left out);
``tests/engine/test_hooked_sdpa.py`` compares the two, by source and by output, so an
upgrade of diffusers that changes the stock processor fails there first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

# The line of HookedSdpaProcessor.__call__ that the stock processor does not have.
HOOK_LINE = "query, key, value = self.hook(attn, hidden_states, query, key, value)"


class HookedSdpaProcessor:
    """diffusers' ``AttnProcessor2_0`` with one hook on the Q/K/V projections.

    Subclasses override :meth:`hook`; everything else must stay identical to the stock
    processor so that a call whose hook returns its inputs is bitwise the stock one.
    """

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See the projections (``hidden_states`` is the input of ``to_q``); return those to attend with."""
        raise NotImplementedError

    # Copied from diffusers.models.attention_processor.AttnProcessor2_0.__call__ (see the module docstring)
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        # The only departure from the stock processor: a hook sees (and may rewrite) the projections.
        query, key, value = self.hook(attn, hidden_states, query, key, value)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states
