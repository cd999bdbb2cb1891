"""HAM in MM-DiT joint attention (SD3): GAR on the image tokens, LAT on the text stream.

An SD3 ``JointTransformerBlock`` has one attention over the joint sequence
[image tokens | text tokens]: the image stream is projected by ``to_q/to_k/to_v``, the
text stream by ``add_q_proj/add_k_proj/add_v_proj``, and both attend together. HAM maps
onto it without new learning (docs/method.md, "Diffusion transformers"):

* **GAR** rewrites the student's *image* Q, K, V (the image→image part, what the UNet's
  self-attention is) with ``α·X^m + (1 − α)·AdaIN(X^c, X^s)``;
* **LAT** replaces the student's *text-stream* K, V with the style teacher's, and
  protects its image queries with the content teacher's, ``β·Q^m + (1 − β)·Q^c``. The
  text stream runs through the blocks with the image tokens and the timestep, so the
  style teacher's text K/V change with the step, and a cached or recorded style holds
  them per step (a UNet's, projections of the prompt alone, once per layer).

A layer selected for both gets GAR first, then LAT's query protection of the regulated
query **[our reading]** (as in a UNet block, where attn2 reads what attn1 produced).

:class:`HookedJointProcessor` keeps diffusers' stock ``JointAttnProcessor2_0`` line for
line and adds one hook between the projections and the head split (where the UNet
processors hook too, so GAR and LAT act before the QK-norm of SD3.5 **[our reading]**).
A hook that returns its inputs gives bitwise the stock result. The arithmetic of GAR and
LAT, the branch layout, cached and recorded stand-ins are those of
:mod:`ham_engine.attention`: the joint processor hands its image projections to a
:class:`~ham_engine.attention.GarProcessor` hook and (image query, text K, text V) to a
:class:`~ham_engine.attention.LatProcessor` hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ham_engine.attention import (
    CONTENT_TEACHER,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    GarProcessor,
    LatProcessor,
    ModulationContext,
    installed_processors,
    mark_lat_step,
    step_lat_entry,
    student_of,
    style_teacher_of,
)
from ham_engine.modulation import lat_query
from ham_engine.recording import TeacherRecording

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def joint_layers(transformer: torch.nn.Module, kind: str) -> list[str]:
    """Attention modules of an SD3 transformer that HAM can modulate as ``kind``, in order.

    GAR (:data:`~ham_engine.attention.SELF_ATTENTION`): every attention over image
    tokens (the joint ``attn`` of each block, and SD3.5's image-only ``attn2``); LAT
    (:data:`~ham_engine.attention.CROSS_ATTENTION`): those with a text stream
    (``add_k_proj``), the joint ``attn`` of each block.
    """
    if kind not in (SELF_ATTENTION, CROSS_ATTENTION):
        raise ValueError(f"kind: {kind!r} is not {SELF_ATTENTION!r} (self) or {CROSS_ATTENTION!r} (cross)")
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, Attention) and (kind == SELF_ATTENTION or getattr(module, "add_k_proj", None) is not None)
    ]


class HookedJointProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with one hook on the image and text projections.

    Subclasses override :meth:`hook`; everything else must stay identical to the stock
    processor so that a call whose hook returns its inputs is bitwise the stock one (the
    text projections are computed before the image head split here, which changes no
    value: each operation reads only its own inputs).
    """

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        image: Projections,
        text: Projections | None,
    ) -> tuple[Projections, Projections | None]:
        """See the image (and text) Q, K, V ``[B, L, inner]``; return those to attend with."""
        raise NotImplementedError

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        query, key, value = self._joint_query_key_value(attn, hidden_states, encoder_hidden_states)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    def _joint_query_key_value(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock processor's projections, head split, QK norms and concatenation, with the hook."""
        batch_size = hidden_states.shape[0]

        # `sample` projections.
        image = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        # `context` projections.
        text = None
        if encoder_hidden_states is not None:
            text = (
                attn.add_q_proj(encoder_hidden_states),
                attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states),
            )

        # The only departure from the stock processor: a hook sees (and may rewrite) the projections.
        (query, key, value), text = self.hook(attn, hidden_states, image, text)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(part, batch_size, attn.heads, head_dim) for part in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if text is not None:
            text_query, text_key, text_value = (_heads(part, batch_size, attn.heads, head_dim) for part in text)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
        return query, key, value


def _heads(projection: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    """``(batch, tokens, heads * head_dim)`` → ``(batch, heads, tokens, head_dim)``, as the stock processor splits."""
    return projection.view(batch_size, -1, heads, head_dim).transpose(1, 2)


class JointLatProcessor(LatProcessor):
    """LAT on joint attention: K^m, V^m ← the style teacher's *text-stream* K, V at this step.

    As :class:`~ham_engine.attention.LatProcessor`, except that what stands in for an
    absent style teacher is held per step (the text stream's K/V change with the step in
    an MM-DiT: :func:`~ham_engine.attention.step_lat_entry`).
    """

    def modulate(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.context
        layout = ctx.layout
        if layout.has(CONTENT_TEACHER):
            content_query = layout.take(query, CONTENT_TEACHER)
        else:
            content_query = ctx.recorded_content.lat_queries[(ctx.step, self.layer)]
        entry = step_lat_entry(self.layer, ctx.step)
        for i in range(ctx.styles):
            teacher, student = style_teacher_of(i), student_of(i)
            record = ctx.style_records[i]
            if layout.has(teacher):
                style_key = layout.take(key, teacher)
                style_value = layout.take(value, teacher)
                if record is not None and entry not in record.lat:
                    record.lat[entry] = (style_key.clone(), style_value.clone())
                    mark_lat_step(record, self.layer, ctx.step)
            else:
                style_key, style_value = ctx.cached_styles[i].lat[entry]
            own_query = layout.take(query, student)
            layout.put(query, student, lat_query(own_query, content_query, ctx.beta))
            layout.put(key, student, style_key)
            layout.put(value, student, style_value)
        return query, key, value


class HamHook:
    """GAR on the image Q/K/V and/or LAT on (image Q, text K/V) of one joint attention layer."""

    def __init__(self, layer: str, context: ModulationContext, gar: bool, lat: bool) -> None:
        self.layer = layer
        self.gar = GarProcessor(layer, context) if gar else None
        self.lat = JointLatProcessor(layer, context) if lat else None

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        image: Projections,
        text: Projections | None,
    ) -> tuple[Projections, Projections | None]:
        if self.gar is not None:
            image = self.gar.hook(attn, hidden_states, *image)
        if self.lat is not None and text is not None:
            query, key, value = self.lat.hook(attn, hidden_states, image[0], text[1], text[2])
            image, text = (query, image[1], image[2]), (text[0], key, value)
        return image, text


class RecordHook:
    """Stock joint attention that shows an inversion call's projections to a :class:`TeacherRecording`.

    GAR's record is the image stream's (its input, for the content teacher; the style
    teacher's Q/K/V statistics); LAT's the content teacher's image query and the style
    teacher's text K/V (per step).
    """

    def __init__(self, layer: str, recording: TeacherRecording, gar: bool, lat: bool) -> None:
        self.layer = layer
        self.recording = recording
        self.gar = gar
        self.lat = lat

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        image: Projections,
        text: Projections | None,
    ) -> tuple[Projections, Projections | None]:
        if self.gar:
            self.recording.see_self_attention(self.layer, hidden_states, *image)
        if self.lat and text is not None:
            self.recording.see_joint_cross_attention(self.layer, image[0], text[1], text[2])
        return image, text


class JointHamProcessor(HamHook, HookedJointProcessor):
    """HAM on an SD3 joint attention layer (:class:`HamHook` in the stock SD3 mechanics)."""


class JointRecorder(RecordHook, HookedJointProcessor):
    """The inversion recorder on an SD3 joint attention layer."""


def _selected(gar_layers: tuple[str, ...], lat_layers: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys([*gar_layers, *lat_layers]))


Installer = Callable[[torch.nn.Module, dict[str, object]], AbstractContextManager[None]]


@contextmanager
def modulated_joint_attention(
    transformer: torch.nn.Module,
    context: ModulationContext,
    processor: Callable[..., HamHook] = JointHamProcessor,
    install: Installer = installed_processors,
) -> Iterator[ModulationContext]:
    """Install ``processor`` (HAM) on every GAR or LAT layer of ``context`` for the block; restore after.

    A layer may carry both GAR and LAT. The context is told its LAT stand-ins are per step.
    """
    context.per_step_lat = True
    processors: dict[str, object] = {
        name: processor(name, context, name in context.gar_layers, name in context.lat_layers)
        for name in _selected(context.gar_layers, context.lat_layers)
    }
    with install(transformer, processors):
        yield context


@contextmanager
def recording_joint_attention(
    transformer: torch.nn.Module,
    recording: TeacherRecording,
    processor: Callable[..., RecordHook] = JointRecorder,
    install: Installer = installed_processors,
) -> Iterator[TeacherRecording]:
    """Install ``processor`` (a recorder) on ``recording``'s layers for the block; restore the originals."""
    processors: dict[str, object] = {
        name: processor(name, recording, name in recording.gar_layers, name in recording.lat_layers)
        for name in _selected(recording.gar_layers, recording.lat_layers)
    }
    with install(transformer, processors):
        yield recording
