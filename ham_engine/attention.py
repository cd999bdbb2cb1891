"""HAM's attention processors: GAR on self-attention, LAT on cross-attention (docs/method.md §3–§4).

Both processors keep the mechanics of diffusers' stock ``AttnProcessor2_0`` line for line
(norms, head split, ``F.scaled_dot_product_attention``, output projection, residual,
rescale) and differ from it only in one hook between the Q/K/V projections and the head
split (:class:`~ham_engine.hooked_sdpa.HookedSdpaProcessor`), where the student's
projections are rewritten. When a step is not modulated the hook returns its inputs
untouched, so the result is bitwise the stock one.

Which batch rows belong to which branch, in which CFG half, is described by a
:class:`BranchLayout` (a branch can run once and serve both halves). One batch can carry
K styles for one content: the content teacher once, and per style ``i`` its style
teacher and its student (:func:`style_teacher_of`, :func:`student_of`; style 0 keeps
the plain names). Each student is modulated from the content teacher and its own
style, exactly as in a one-style batch. All
per-transfer state (layout, step, α/β, cached style features, recorded teachers,
recorders) travels in a :class:`ModulationContext` that the engine owns and updates before
each UNet call. The processors are installed and the originals restored by
:func:`modulated_attention`. A teacher absent from the batch is read from what stands in for
it: the style cache's features, or what :mod:`ham_engine.recording` kept during inversion.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import Attention

from ham_engine.feature_cache import StyleFeatures
from ham_engine.hooked_sdpa import HookedSdpaProcessor
from ham_engine.modulation import channel_stats, gar_blend, lat_query
from ham_engine.params import ParamError

if TYPE_CHECKING:
    from ham_engine.recording import ContentFeatures

CONTENT_TEACHER = "content_teacher"
STYLE_TEACHER = "style_teacher"
STUDENT = "student"
BRANCHES = (CONTENT_TEACHER, STYLE_TEACHER, STUDENT)


def style_teacher_of(style: int) -> str:
    """The branch name of style ``style``'s teacher in a K-style batch (style 0: ``style_teacher``)."""
    return STYLE_TEACHER if style == 0 else f"{STYLE_TEACHER}.{style}"


def student_of(style: int) -> str:
    """The branch name of the student of style ``style`` in a K-style batch (style 0: ``student``)."""
    return STUDENT if style == 0 else f"{STUDENT}.{style}"


def _known_branch(branch: str) -> bool:
    if branch in BRANCHES:
        return True
    base, _, index = branch.partition(".")
    return base in (STYLE_TEACHER, STUDENT) and index.isdigit() and index == str(int(index)) and int(index) > 0


# Kinds of attention layer, named as SD's transformer blocks name them (selection is by type).
SELF_ATTENTION = "attn1"
CROSS_ATTENTION = "attn2"


@dataclass(frozen=True)
class BranchLayout:
    """The rows of one UNet batch: which branch, in which half, each row holds.

    Without classifier-free guidance there is one half; with it, two: [uncond | cond],
    each holding ``branches`` in order. A branch named in ``shared`` runs once, in the
    uncond half, and that row serves both halves: for a branch whose two rows would be
    identical (same latent, timestep and text conditioning) the second is dropped.
    :attr:`rows` spells out the result, ``(branch, half)`` per batch row.
    """

    branches: tuple[str, ...]
    halves: int = 1
    shared: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must be distinct and non-empty, got {self.branches}")
        unknown = {b for b in self.branches if not _known_branch(b)}
        if unknown:
            raise ValueError(f"unknown branches {sorted(unknown)}; known: {BRANCHES}")
        if self.halves not in (1, 2):
            raise ValueError(f"halves must be 1 or 2, got {self.halves}")
        if self.shared and self.halves == 1:
            raise ValueError(f"only two halves can share a row, got shared={self.shared} with one half")
        if not set(self.shared) <= set(self.branches):
            raise ValueError(f"shared branches {self.shared} must be among the branches {self.branches}")

    @cached_property
    def rows(self) -> tuple[tuple[str, int], ...]:
        """``(branch, half)`` of each batch row, in batch order (half 0 is uncond under CFG)."""
        return tuple(
            (branch, half)
            for half in range(self.halves)
            for branch in self.branches
            if half == 0 or branch not in self.shared
        )

    @property
    def batch_size(self) -> int:
        """Batch size of a UNet call with this layout."""
        return len(self.rows)

    def has(self, branch: str) -> bool:
        """Whether ``branch`` has rows in this batch."""
        return branch in self.branches

    def rows_of(self, branch: str) -> list[int]:
        """Batch rows that hold ``branch``, uncond first: one per half, or one serving both when shared."""
        return [i for i, (name, _) in enumerate(self.rows) if name == branch]

    def row(self, branch: str, half: int) -> int:
        """The batch row to read for ``branch`` in ``half`` (a shared branch's uncond row serves both)."""
        rows = self.rows_of(branch)
        return rows[half] if len(rows) == self.halves else rows[0]

    def take(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        """The rows of ``branch`` as a view of ``x`` (batch first); writes go through to ``x``.

        ``[halves, ...]``, one row per half; ``[1, ...]`` for a branch with one row, which
        broadcasts over the halves wherever it meets another branch's rows.
        """
        rows = self.rows_of(branch)
        if not rows:
            raise ValueError(f"{branch} has no rows in this batch ({self.branches})")
        first, *rest = rows
        stride = rest[0] - first if rest else 1
        return x[first : first + stride * len(rest) + 1 : stride]

    def put(self, x: torch.Tensor, branch: str, value: torch.Tensor) -> None:
        """Overwrite the rows of ``branch`` in ``x`` with ``value`` (shaped as :meth:`take`), in place."""
        self.take(x, branch).copy_(value)


def step_lat_entry(layer: str, step: int) -> str:
    """The :attr:`StyleFeatures.lat` key of a layer's style K/V at ``step``, where they change with the step.

    A UNet's cross-attention K/V are projections of the text embedding alone, one entry per
    layer. In a joint-attention transformer (``ham_engine.joint_attention``) the text stream
    runs through the blocks with the image and the timestep, so its K/V differ per step:
    one entry per (layer, step), and under the plain layer name the steps held
    (:func:`mark_lat_step`), which is what presence checks see.
    """
    return f"{layer}@{step}"


def mark_lat_step(features: StyleFeatures, layer: str, step: int) -> None:
    """Add ``step`` to the steps ``features`` holds per-step K/V of ``layer`` for (see :func:`step_lat_entry`)."""
    held = features.lat.get(layer, (None, None))[0]
    step_tensor = torch.tensor([step], dtype=torch.int64)
    steps = step_tensor if held is None else torch.cat([held.cpu(), step_tensor])
    features.lat[layer] = (steps, steps.clone())  # two tensors: a blob refuses shared storage


@dataclass(frozen=True)
class AttentionEvent:
    """What a recorder sees at one modulated layer call (debugging and tests).

    ``before`` are the Q, K, V projections of the whole batch before modulation (copies);
    ``after`` are the tensors the layer attends with. Do not modify them.
    """

    layer: str
    module: str  # "gar" or "lat"
    step: int
    layout: BranchLayout
    before: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    after: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


AttentionRecorder = Callable[[AttentionEvent], None]


@dataclass
class ModulationContext:
    """Per-transfer state shared by the installed processors (never global).

    The engine calls :meth:`begin_step` before each UNet call. ``cached_styles`` and
    ``style_records`` hold one entry per style of the batch (``styles`` of them). Where
    the batch has no teacher for style ``i``, ``cached_styles[i]`` stands in for it (the
    style cache's features, or those recorded during inversion); where it has one and
    ``style_records[i]`` is set, what the student takes from it is written there (the cold
    path filling the style cache). Where the batch has no content teacher,
    ``recorded_content`` stands in for it.
    """

    alpha: float
    beta: float
    gar_layers: tuple[str, ...] = ()
    lat_layers: tuple[str, ...] = ()
    cached_styles: tuple[StyleFeatures | None, ...] = (None,)
    style_records: tuple[StyleFeatures | None, ...] = (None,)
    recorded_content: ContentFeatures | None = None
    recorder: AttentionRecorder | None = None
    layout: BranchLayout = field(default_factory=lambda: BranchLayout((STUDENT,)))
    step: int = 0
    modulating: bool = False
    per_step_lat: bool = False  # LAT stand-ins are held per step (a joint-attention denoiser sets it)

    def __post_init__(self) -> None:
        self.cached_styles = tuple(self.cached_styles)
        self.style_records = tuple(self.style_records)
        if not self.cached_styles or len(self.cached_styles) != len(self.style_records):
            raise ValueError("cached_styles and style_records need one entry per style")

    @property
    def styles(self) -> int:
        """How many styles (students) the batch carries."""
        return len(self.cached_styles)

    def content_held(self, step: int) -> bool:
        """Whether recorded content-teacher features stand in for its row at ``step``."""
        return self.recorded_content is not None and self.recorded_content.holds(step)

    def style_held(self, step: int, style: int = 0) -> bool:
        """Whether cached or recorded features of style ``style`` cover every modulated layer at ``step``."""
        features = self.cached_styles[style]
        lat_keys = [step_lat_entry(layer, step) if self.per_step_lat else layer for layer in self.lat_layers]
        return features is not None and all((step, layer) in features.gar for layer in self.gar_layers) and all(
            key in features.lat for key in lat_keys
        )

    def begin_step(self, step: int, layout: BranchLayout, modulating: bool) -> None:
        """Describe the next UNet call: its sampling step, its rows, and whether GAR/LAT act."""
        if modulating:
            if not layout.has(CONTENT_TEACHER) and not self.content_held(step):
                raise ValueError(f"step {step}: a modulated step needs a content teacher row or recorded features")
            for i in range(self.styles):
                student, teacher = student_of(i), style_teacher_of(i)
                if not layout.has(student):
                    raise ValueError(f"a modulated step needs student rows, got {layout.branches}")
                if not layout.has(teacher) and not self.style_held(step, i):
                    raise ValueError(f"step {step}: a modulated step needs a style teacher row or held style features")
                if student in layout.shared and not (teacher in layout.shared or not layout.has(teacher)):
                    raise ValueError("a modulated step needs the student's own row in each half: its halves differ")
        self.step = step
        self.layout = layout
        self.modulating = modulating


def attention_layers(unet: torch.nn.Module, kind: str) -> list[str]:
    """Names of the UNet's attention modules of ``kind`` (self or cross attention), in order.

    Selected by what a module is (``Attention.is_cross_attention``), not by its name, so a
    UNet whose blocks name their attentions differently is read right. ``kind`` is
    :data:`SELF_ATTENTION` ("attn1") or :data:`CROSS_ATTENTION` ("attn2"), the names SD's
    transformer blocks give them.
    """
    if kind not in (SELF_ATTENTION, CROSS_ATTENTION):
        raise ValueError(f"kind: {kind!r} is not {SELF_ATTENTION!r} (self) or {CROSS_ATTENTION!r} (cross)")
    if hasattr(unet, "ham_attention_layers"):  # a joint-attention denoiser lists its own (ham_engine.dit)
        return list(unet.ham_attention_layers(kind))
    cross = kind == CROSS_ATTENTION
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and bool(module.is_cross_attention) == cross
    ]


def resolve_layers(unet: torch.nn.Module, patterns: Sequence[str], kind: str, field_name: str) -> tuple[str, ...]:
    """The ``kind`` attention modules whose names match any fnmatch pattern; ParamError if none do.

    ``field_name`` ("gar_layers" / "lat_layers") is the parameter named in the error.
    """
    names = attention_layers(unet, kind)
    selected = tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if not selected:
        examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ParamError(
            field_name,
            f"patterns {list(patterns)} match no {kind} layer of this UNet; its {kind} layers are named "
            f"like {examples}",
        )
    return selected


class _ModulatingProcessor(HookedSdpaProcessor):
    """A hooked processor whose hook is HAM's rewrite of the student's projections."""

    module = ""

    def __init__(self, layer: str, context: ModulationContext) -> None:
        self.layer = layer
        self.context = context

    def modulate(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def hook(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.context
        if not ctx.modulating:
            return query, key, value
        if ctx.recorder is None:
            return self.modulate(attn, query, key, value)
        before = (query.clone(), key.clone(), value.clone())
        after = self.modulate(attn, query, key, value)
        ctx.recorder(AttentionEvent(self.layer, self.module, ctx.step, ctx.layout, before, after))
        return after


class GarProcessor(_ModulatingProcessor):
    """Self-attention with global attention regulation of the student's Q, K and V.

    Q̂^m = α·Q^m + (1−α)·AdaIN(Q^c, Q^s), likewise K and V; statistics per channel over
    tokens, separately per CFG half (a content teacher row shared by both halves gives
    both the same statistics). The style statistics come from the style teacher's rows
    when present (and are recorded for the cache), else from the cached features. The
    content teacher's Q, K, V come from its row, else are re-projected from its recorded
    attention input.
    """

    module = "gar"

    def modulate(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.context
        layout = ctx.layout
        projections = (query, key, value)
        # The content teacher's Q, K, V (one set for every student): its rows, else re-projected.
        if layout.has(CONTENT_TEACHER):
            contents = [layout.take(x, CONTENT_TEACHER) for x in projections]
        else:
            recorded = ctx.recorded_content.gar_inputs[(ctx.step, self.layer)]
            contents = [attn.to_q(recorded), attn.to_k(recorded), attn.to_v(recorded)]
        for i in range(ctx.styles):
            self._modulate_student(i, projections, contents)
        return query, key, value

    def _modulate_student(
        self,
        i: int,
        projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        contents: list[torch.Tensor],
    ) -> None:
        ctx = self.context
        layout = ctx.layout
        teacher, student = style_teacher_of(i), student_of(i)
        widths = [x.shape[-1] for x in projections]
        if layout.has(teacher):
            style_stats = [channel_stats(layout.take(x, teacher), dim=1) for x in projections]
            record = ctx.style_records[i]
            if record is not None:
                means, stds = zip(*style_stats, strict=True)
                record.gar[(ctx.step, self.layer)] = (torch.cat(means, -1), torch.cat(stds, -1))
        else:
            mean, std = ctx.cached_styles[i].gar[(ctx.step, self.layer)]
            style_stats = list(zip(mean.split(widths, dim=-1), std.split(widths, dim=-1), strict=True))
        # Q, K and V one by one on views of the batch: joining them along the channels
        # first would copy every branch's features for nothing.
        for x, content, (style_mean, style_std) in zip(projections, contents, style_stats, strict=True):
            own = layout.take(x, student)
            layout.put(x, student, gar_blend(own, content, style_mean, style_std, ctx.alpha))


class LatProcessor(_ModulatingProcessor):
    """Cross-attention with local attention transplantation into the student.

    K^m, V^m ← K^s, V^s (the style teacher's, live or cached) and
    Q̂^m = β·Q^m + (1−β)·Q^c, separately per CFG half (Q^c from the content teacher's
    row for that half, which under CFG is its one row serving both; else its recorded Q^c).
    """

    module = "lat"

    def modulate(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx = self.context
        layout = ctx.layout
        if layout.has(CONTENT_TEACHER):
            content_query = layout.take(query, CONTENT_TEACHER)
        else:
            content_query = ctx.recorded_content.lat_queries[(ctx.step, self.layer)]
        for i in range(ctx.styles):
            teacher, student = style_teacher_of(i), student_of(i)
            record = ctx.style_records[i]
            if layout.has(teacher):
                style_key = layout.take(key, teacher)
                style_value = layout.take(value, teacher)
                if record is not None and self.layer not in record.lat:
                    record.lat[self.layer] = (style_key.clone(), style_value.clone())
            else:
                style_key, style_value = ctx.cached_styles[i].lat[self.layer]
            own_query = layout.take(query, student)
            layout.put(query, student, lat_query(own_query, content_query, ctx.beta))
            layout.put(key, student, style_key)
            layout.put(value, student, style_value)
        return query, key, value


@contextmanager
def installed_processors(unet: torch.nn.Module, processors: dict[str, object]) -> Iterator[None]:
    """Set ``processors`` (attention module name → processor) for the block, then put the originals back.

    The originals are restored also when the block raises; a name that is not an attention
    module of ``unet`` is an error.
    """
    modules = dict(unet.named_modules())
    originals: dict[str, object] = {}
    try:
        for name, processor in processors.items():
            module = modules.get(name)
            if not isinstance(module, Attention):
                raise ValueError(f"{name!r} is not an attention module of this UNet")
            originals[name] = module.processor
            module.set_processor(processor)
        yield
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)


@contextmanager
def modulated_attention(unet: torch.nn.Module, context: ModulationContext) -> Iterator[ModulationContext]:
    """Install GAR on ``context.gar_layers`` and LAT on ``context.lat_layers`` for the block.

    The original processors are put back on exit, also when the block raises. A layer
    in both lists is an error (GAR is for ``attn1``, LAT for ``attn2``).
    """
    if hasattr(unet, "ham_modulated_attention"):  # a joint-attention denoiser installs its own (ham_engine.dit)
        with unet.ham_modulated_attention(context):
            yield context
        return
    overlap = set(context.gar_layers) & set(context.lat_layers)
    if overlap:
        raise ValueError(f"layers selected for both GAR and LAT: {sorted(overlap)}")
    processors: dict[str, object] = {name: GarProcessor(name, context) for name in context.gar_layers}
    processors.update({name: LatProcessor(name, context) for name in context.lat_layers})
    with installed_processors(unet, processors):
        yield context
