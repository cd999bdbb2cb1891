"""Teachers recorded during inversion: what GAR and LAT read from them, kept for sampling.

With the "source" inversion convention (``ham_engine.inversion``) the inversion call that
starts from trajectory latent z_k is the UNet on z_k at timestep t_k with the empty
prompt: exactly the call a re-anchored teacher makes at sampling step k, for every step
but the first (z_T, which no inversion step starts from). So instead of running the
teachers again in the sampling batch, the inversion pass keeps what the student's
modulation will read from them, per modulated layer and step:

* **content teacher** – per GAR layer the input of its self-attention projections (after
  the block's norm; GAR re-projects it to Q, K, V at sampling time: a third of their
  bytes), per LAT layer its cross-attention query Q^c;
* **image style teacher** (no style prompt: with one, its sampling calls are conditioned
  on the prompt and differ from the empty-prompt inversion) – what the style cache keeps,
  :class:`~ham_engine.feature_cache.StyleFeatures`: per GAR layer and step the statistics of
  its Q, K, V, per LAT layer its K, V once.

Tensors stay in the model dtype on the model device. A :class:`TeacherRecording` is
bounded by a byte budget: the first inversion call (the clean latent, never a teacher
call) measures what one step costs, and a recording that would not fit records nothing
(``fallback`` says why); the engine then runs the teachers live. The processors are
:class:`~ham_engine.attention.HookedSdpaProcessor` s, stock attention with a hook that only
looks, installed by :func:`recording_attention`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from ham_engine.attention import installed_processors, mark_lat_step, step_lat_entry
from ham_engine.feature_cache import StyleFeatures
from ham_engine.hooked_sdpa import HookedSdpaProcessor
from ham_engine.modulation import channel_stats

# The default budget, as a fraction of the device's memory: recording SD 2.1 at 512² for 50
# steps in fp16 takes ~1.3 GB, SDXL at 1024² ~11 GB (docs/performance.md).
DEFAULT_RECORD_FRACTION = {"cuda": 0.25, "cpu": 0.125}


def default_record_bytes(device: torch.device | str) -> int:
    """The recording budget when ``HAM_RECORD_BYTES`` is unset: a share of the device's memory.

    CUDA: a quarter of the GPU's total memory; elsewhere an eighth of the machine's RAM.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_RECORD_FRACTION.get(device.type, DEFAULT_RECORD_FRACTION["cpu"]))


def check_record_bytes(value: object) -> int | None:
    """``value`` as a recording budget (bytes >= 0, or None for the device default); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"record_bytes: must be an integer >= 0 (0: never record), got {value!r}")
    return value


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class ContentFeatures:
    """What the student reads from the content teacher at the recorded steps.

    ``gar_inputs`` maps (step, layer) to the content row's self-attention input
    ``[1, L, C]``; ``lat_queries`` maps (step, layer) to its cross-attention query
    ``[1, L, inner]``. ``steps`` are the steps recorded in full.
    """

    gar_inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    lat_queries: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    steps: set[int] = field(default_factory=set)

    def holds(self, step: int) -> bool:
        """Whether every modulated layer's features are held for ``step``."""
        return step in self.steps

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for byte accounting)."""
        return [*self.gar_inputs.values(), *self.lat_queries.values()]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held."""
        return _nbytes(self.tensors())

    def clear(self) -> None:
        """Let go of every tensor."""
        self.gar_inputs.clear()
        self.lat_queries.clear()
        self.steps.clear()


class TeacherRecording:
    """What one "source" inversion records of its teachers, within ``budget`` bytes.

    The inversion batch holds the content at ``content_row`` (None: the content is not
    inverted here, so its teacher is not recorded) and each recorded image style at one
    of ``style_rows`` (its features go into ``styles[row]``, a :class:`StyleFeatures` that
    can then serve the style cache). ``steps`` are the sampling steps to record
    (modulated, not the first). The engine calls :meth:`begin_call` with the schedule
    index of each inversion call before it and :meth:`end_call` after it.
    """

    def __init__(
        self,
        steps: frozenset[int],
        gar_layers: tuple[str, ...],
        lat_layers: tuple[str, ...],
        budget: int,
        content_row: int | None = 0,
        style_rows: tuple[int, ...] = (),
    ) -> None:
        self.steps = steps
        self.gar_layers = gar_layers
        self.lat_layers = lat_layers
        self.budget = budget
        self.content_row = content_row
        self.content = ContentFeatures()
        self.styles: dict[int, StyleFeatures] = {row: StyleFeatures() for row in style_rows}
        self.fallback: str | None = None
        self.recorded_bytes = 0  # what the inversion recorded (kept after release, for stats)
        self._step: int | None = None  # the sampling step the current call is, when recorded
        self._measuring = False
        self._step_bytes = 0  # one step's record, measured on the first call
        self._once_bytes = 0  # the style's LAT K/V, recorded once

    @property
    def active(self) -> bool:
        """Whether the recording is usable: not fallen back to live teachers."""
        return self.fallback is None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage held now (content and style features)."""
        return self.content.nbytes + sum(_nbytes(style.tensors()) for style in self.styles.values())

    def begin_call(self, index: int, total: int) -> None:
        """Before the inversion call at schedule index ``index`` of ``total`` (``total``: the clean latent)."""
        self._measuring = self.active and index == total and bool(self.steps)
        self._step = index if self.active and index in self.steps else None

    def end_call(self) -> None:
        """After an inversion call: check the budget after measuring, count a recorded step."""
        if self._measuring:
            self._measuring = False
            needed = self._step_bytes * len(self.steps) + self._once_bytes
            if needed > self.budget:
                self._fall_back(f"the recording needs {needed} bytes, over the budget of {self.budget}")
        elif self._step is not None:
            if self.content_row is not None:
                self.content.steps.add(self._step)
            self.recorded_bytes = self.nbytes
            if self.recorded_bytes > self.budget:  # a safety net: the measured projection is exact
                self._fall_back(f"the recording reached {self.recorded_bytes} bytes, over the budget of {self.budget}")
        self._step = None

    def _fall_back(self, reason: str) -> None:
        self.fallback = reason
        self.recorded_bytes = 0
        self.discard()

    def release(self) -> None:
        """Free the content features (after sampling, or when it stopped); the style features stay."""
        self.content.clear()

    def discard(self) -> None:
        """Free everything recorded (the transfer failed, or fell back to live teachers)."""
        self.content.clear()
        for style in self.styles.values():
            style.gar.clear()
            style.lat.clear()
            style.terminal_mean = style.terminal_std = None

    # -- what the processors see --------------------------------------------------------

    def _content_row(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The content's row of ``x`` as ``[1, ...]``, in a list; empty when the content is not recorded."""
        row = self.content_row
        return [] if row is None else [x[row : row + 1]]

    def see_self_attention(
        self, layer: str, hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """A GAR layer's inversion call: the content row's input, the style row's Q/K/V statistics."""
        if self._step is None and not self._measuring:
            return
        content = self._content_row(hidden_states)
        if self._measuring:
            # Two float32 statistics (mean, std) per channel of Q, K and V, per style.
            widths = query.shape[-1] + key.shape[-1] + value.shape[-1]
            self._step_bytes += _nbytes(content) + len(self.styles) * 2 * 4 * widths
            return
        # A copy, not a view: a view would keep the whole inversion batch alive.
        for row in content:
            self.content.gar_inputs[(self._step, layer)] = row.clone()
        for row, style in self.styles.items():
            means, stds = zip(*(channel_stats(x[row : row + 1], dim=1) for x in (query, key, value)), strict=True)
            style.gar[(self._step, layer)] = (torch.cat(means, -1), torch.cat(stds, -1))

    def see_cross_attention(self, layer: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """A LAT layer's inversion call: the content row's query, the style row's K/V (once)."""
        if self._step is None and not self._measuring:
            return
        content = self._content_row(query)
        if self._measuring:
            self._step_bytes += _nbytes(content)
            self._once_bytes += len(self.styles) * _nbytes([key[:1], value[:1]])
            return
        for row in content:
            self.content.lat_queries[(self._step, layer)] = row.clone()
        for row, style in self.styles.items():
            if layer not in style.lat:
                style.lat[layer] = (key[row : row + 1].clone(), value[row : row + 1].clone())


    def see_joint_cross_attention(
        self, layer: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """A joint-attention LAT layer's inversion call: the content's image query, the style's text K/V *per step*.

        In an MM-DiT the text stream's K/V change with the step (``step_lat_entry``).
        """
        if self._step is None and not self._measuring:
            return
        content = self._content_row(query)
        if self._measuring:
            self._step_bytes += _nbytes(content) + len(self.styles) * _nbytes([key[:1], value[:1]])
            return
        for row in content:
            self.content.lat_queries[(self._step, layer)] = row.clone()
        for row, style in self.styles.items():
            style.lat[step_lat_entry(layer, self._step)] = (key[row : row + 1].clone(), value[row : row + 1].clone())
            mark_lat_step(style, layer, self._step)


class GarRecorder(HookedSdpaProcessor):
    """Stock self-attention that shows each call's input and projections to a :class:`TeacherRecording`."""

    def __init__(self, layer: str, recording: TeacherRecording) -> None:
        self.layer = layer
        self.recording = recording

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.recording.see_self_attention(self.layer, hidden_states, query, key, value)
        return query, key, value


class LatRecorder(HookedSdpaProcessor):
    """Stock cross-attention that shows each call's projections to a :class:`TeacherRecording`."""

    def __init__(self, layer: str, recording: TeacherRecording) -> None:
        self.layer = layer
        self.recording = recording

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.recording.see_cross_attention(self.layer, query, key, value)
        return query, key, value


@contextmanager
def recording_attention(unet: torch.nn.Module, recording: TeacherRecording) -> Iterator[TeacherRecording]:
    """Install the recorders on ``recording``'s GAR and LAT layers for the block; restore the originals."""
    if hasattr(unet, "ham_recording_attention"):  # a joint-attention denoiser installs its own (ham_engine.dit)
        with unet.ham_recording_attention(recording):
            yield recording
        return
    processors: dict[str, object] = {name: GarRecorder(name, recording) for name in recording.gar_layers}
    processors.update({name: LatRecorder(name, recording) for name in recording.lat_layers})
    with installed_processors(unet, processors):
        yield recording
