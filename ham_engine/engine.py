"""HamEngine: one HAM style transfer end to end (docs/method.md).

A transfer runs in four phases:

1. **encode** – the prompts (each distinct one once, by the model family's adapter) and
   the images (VAE, each on its own, float32 latents);
2. **invert** – DDIM inversion of the content latent, batched with the style latent when
   an image style teacher is needed and not cached: ``steps`` UNet calls. With the
   "source" convention (``params.inversion``) these calls are the teachers' own calls at
   the sampling steps after the first, and what GAR and LAT read from them is recorded
   (:mod:`ham_engine.recording`, within the engine's ``record_bytes``);
3. **sample** – ``steps`` UNet calls, each one batch holding the branches the step needs
   (content teacher, style teacher, student; as [uncond | cond] halves under CFG). The
   teachers are re-anchored to their trajectories; the student starts from SINI and is
   modulated by GAR and LAT inside the step window;
4. **decode** – the student's final latent through the VAE.

Repeat inputs skip work (docs/method.md §7). A repeat image style (same image, size, steps,
layers, window, prompt, model) needs neither its inversion nor its teacher rows: its
recorded features stand in. A repeat content skips its inversion: the stored trajectory
is re-used. Both live in two tiers, the in-process LRU and an optional shared
:class:`~ham_engine.feature_store.FeatureStore` (:mod:`ham_engine.feature_tiers`).
So a cold image-style transfer is 5N UNet rows, a warm style 3N, warm style and content 2N.

:meth:`HamEngine.transfer_batch` runs K styles for one content in one pass: the content
is inverted once (batched with the cold image styles), and each sampling step is one
UNet batch holding the content teacher once, each live style teacher and each student.
A one-style transfer is the same loop with K = 1.

A branch that nothing reads at a step is left out of that step's batch: outside the
step window the student runs alone, a cached image style never runs at all, and a
recorded teacher runs only at the first step (see :meth:`HamEngine._live_teachers`). Under
CFG a branch whose uncond and cond rows would be identical runs once and serves both
halves: the content teacher always (its re-anchored latent, the timestep and the empty
prompt are the same in both), and the student outside the step window while the text
style teacher still runs (unmodulated, empty prompt in both; its guided output
``uncond + g·(cond − uncond)`` is then that one row). A modulated CFG step is 5 rows,
not 6.

Under CFG (a text-guided style teacher) the student is guided too **[our reading]**,
``params.guide_student``: its cond half receives the prompted style teacher's K/V through
LAT, its uncond half the empty prompt's, and ``uncond + g·(cond − uncond)`` carries the
prompt into the student. With an image style and no style prompt, teacher and student
share the empty prompt, so LAT's K/V transplant changes nothing and its query blend is
what acts (docs/method.md §4).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ham_engine import images
from ham_engine.attention import (
    CONTENT_TEACHER,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    AttentionRecorder,
    BranchLayout,
    ModulationContext,
    modulated_attention,
    resolve_layers,
    student_of,
    style_teacher_of,
)
from ham_engine.families import PromptEmbeddings
from ham_engine.feature_store import FeatureStore, open_feature_store
from ham_engine.feature_tiers import FeatureTiers, latent_shape
from ham_engine.inversion import DdimSchedule, ddim_invert, ddim_step
from ham_engine.loading import DiffusionModel, load_model
from ham_engine.modulation import channel_stats, sini
from ham_engine.params import DEFAULT_LAYERS, ParamError, TransferParams, check_style_reference
from ham_engine.recording import TeacherRecording, check_record_bytes, default_record_bytes, recording_attention
from ham_engine.style_cache import ContentKey, ContentTrajectory, StyleCache, StyleFeatures, StyleKey

DEFAULT_STYLE_CACHE_BYTES = 256 * 2**20
DEFAULT_CONTENT_CACHE_BYTES = 256 * 2**20
DEFAULT_MAX_STYLES = 8

ProgressFn = Callable[[int, int], None]
CancelledFn = Callable[[], bool]


class TransferCancelled(Exception):
    """The caller's ``cancelled()`` returned True; the transfer stopped between two steps."""


class NumericalError(RuntimeError):
    """A latent, a UNet output or the decoded image stopped being finite (an overflow, usually fp16).

    The transfer stops there instead of turning NaN into a black picture; the message
    names the phase and step. Not the caller's fault: the worker fails the job with
    ``numerical_error``.
    """


@dataclass
class TransferResult:
    """The stylised image and what it cost (see :meth:`HamEngine.transfer` for ``stats``)."""

    image: Image.Image
    stats: dict[str, Any]


@dataclass
class BatchResult:
    """One stylised image per style, in the order given, and what the run cost.

    ``stats`` is :meth:`HamEngine.transfer`'s, with ``styles``: per style its
    ``style_cache_hit``, ``style_cache_tier``, ``mode`` and ``cfg``.
    """

    images: list[Image.Image]
    stats: dict[str, Any]


@dataclass(frozen=True)
class Style:
    """One style of a batch: an image, a prompt, or both (see :meth:`HamEngine.transfer_batch`)."""

    image: Image.Image | None = None
    prompt: str | None = None


StyleSpec = Image.Image | str | Style


@dataclass
class TransferLatents:
    """The latent-space result of a transfer (before VAE decoding), for tests and analysis."""

    student: torch.Tensor  # z_0^m, float32 [1, C, h, w]
    content_terminal: torch.Tensor  # z_T^c, the inverted content latent
    student_terminal: torch.Tensor  # z_T^m, after SINI
    stats: dict[str, Any]


@dataclass(frozen=True)
class _StyleRequest:
    """One validated style of a request."""

    image: Image.Image | None  # RGB
    prompt: str | None
    guidance: float

    @property
    def text_guided(self) -> bool:
        """The style teacher is sampled from noise with the style prompt (no style image)."""
        return self.image is None

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance on the style teacher (text-guided only; 1.0 is a no-op)."""
        return self.text_guided and self.guidance > 1.0

    @property
    def mode(self) -> str:
        return "text" if self.text_guided else ("image+text" if self.prompt else "image")


@dataclass(frozen=True)
class _Request:
    """A validated transfer request: one content, K styles."""

    content: Image.Image  # RGB
    styles: tuple[_StyleRequest, ...]
    params: TransferParams
    size: tuple[int, int]  # (width, height) of the output
    gar_layers: tuple[str, ...]  # resolved module names, () when GAR is off
    lat_layers: tuple[str, ...]

    @property
    def modulated_steps(self) -> frozenset[int]:
        """Sampling steps where GAR or LAT act."""
        if not (self.gar_layers or self.lat_layers):
            return frozenset()
        return frozenset(k for k in range(self.params.steps) if self.params.modulates_step(k))

    @property
    def uses_style(self) -> bool:
        """Whether anything reads the style teacher (SINI, or GAR/LAT at some step)."""
        return self.params.sini or bool(self.modulated_steps)

    @property
    def recordable_steps(self) -> frozenset[int]:
        """Modulated steps whose teacher calls a "source" inversion makes: all but the first."""
        if self.params.inversion != "source" or self.params.teachers == "live":
            return frozenset()
        return frozenset(k for k in self.modulated_steps if k > 0)


@dataclass
class _Counters:
    unet_calls: int = 0
    unet_rows: int = 0
    rows_by_phase: dict[str, int] = field(default_factory=lambda: {"invert": 0, "sample": 0})
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Text:
    """Encoded prompts: the empty one, and each style teacher's (the empty one when it has none)."""

    empty: PromptEmbeddings
    styles: tuple[PromptEmbeddings, ...]


@dataclass
class _Branches:
    """The latents each branch enters a sampling step with: the content teacher, per style teacher and student."""

    students: list[torch.Tensor]
    content_trajectory: list[torch.Tensor]
    style_trajectories: list[list[torch.Tensor] | None]  # an inverted image style
    style_latents: list[torch.Tensor | None]  # a text style teacher's own, advancing latent
    names: dict[str, tuple[str, int]] = field(default_factory=dict)  # branch → (role, style)

    def __post_init__(self) -> None:
        for i in range(len(self.students)):
            self.names[student_of(i)] = ("student", i)
            self.names[style_teacher_of(i)] = ("teacher", i)

    def latent(self, branch: str, k: int) -> torch.Tensor:
        """``branch``'s latent at step ``k``; teachers are re-anchored to their stored trajectories."""
        if branch == CONTENT_TEACHER:
            return self.content_trajectory[k]
        role, i = self.names[branch]
        if role == "student":
            return self.students[i]
        trajectory = self.style_trajectories[i]
        return trajectory[k] if trajectory is not None else self.style_latents[i]


class _StepHooks:
    """The caller's progress and cancellation callbacks, counted over inversion and sampling."""

    def __init__(self, total: int, progress: ProgressFn | None, cancelled: CancelledFn | None) -> None:
        self.total = total
        self.count = 0
        self._progress = progress
        self._cancelled = cancelled

    def check(self, _: int = 0) -> None:
        """Before a step: stop if the caller asked to."""
        if self._cancelled is not None and self._cancelled():
            raise TransferCancelled(f"transfer cancelled after {self.count} of {self.total} steps")

    def done(self) -> None:
        """After a step: report it."""
        self.count += 1
        if self._progress is not None:
            self._progress(self.count, self.total)


class HamEngine:
    """A loaded diffusion model that runs HAM transfers, one at a time, request after request.

    ``transfer`` is thread-safe: a lock keeps two threads from sharing the UNet. Repeat
    image styles and repeat contents are served from two tiers (docs/method.md §7): an
    in-process LRU each (``style_cache``, ``content_cache``), then ``feature_store``
    when one is given, shared with every engine pointed at it. ``record_bytes``
    bounds what one transfer may record of its teachers during inversion (None: a share of
    the device's memory, :func:`~ham_engine.recording.default_record_bytes`; 0: never
    record); a transfer whose recording would not fit runs its teachers live.
    """

    def __init__(
        self,
        model: DiffusionModel,
        style_cache_bytes: int = DEFAULT_STYLE_CACHE_BYTES,
        record_bytes: int | None = None,
        content_cache_bytes: int = DEFAULT_CONTENT_CACHE_BYTES,
        feature_store: str | FeatureStore | None = None,
        max_styles: int = DEFAULT_MAX_STYLES,
    ) -> None:
        if isinstance(max_styles, bool) or not isinstance(max_styles, int) or max_styles < 1:
            raise ValueError(f"max_styles: must be an integer >= 1, got {max_styles!r}")
        self.model = model
        self.style_cache = StyleCache(style_cache_bytes)
        budget = check_record_bytes(record_bytes)
        self.record_bytes = default_record_bytes(model.device) if budget is None else budget
        self.content_cache = StyleCache(content_cache_bytes, field="content_cache_bytes")
        self.features = FeatureTiers(model, self.style_cache, self.content_cache, open_feature_store(feature_store))
        self.max_styles = max_styles
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str = "tiny",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        style_cache_bytes: int = DEFAULT_STYLE_CACHE_BYTES,
        record_bytes: int | None = None,
        content_cache_bytes: int = DEFAULT_CONTENT_CACHE_BYTES,
        feature_store: str | FeatureStore | None = None,
        max_styles: int = DEFAULT_MAX_STYLES,
    ) -> HamEngine:
        """Load ``model`` ("tiny", "tiny-v", an HF id or a local folder) and wrap it in an engine.

        ``feature_store`` is a directory path or any object with ``get(key) -> bytes | None``
        and ``put(key, bytes)`` (:class:`~ham_engine.feature_store.FeatureStore`): what one
        engine computes for a style or a content, every engine sharing the store re-uses.
        """
        check_record_bytes(record_bytes)  # before the load, which takes long
        return cls(
            load_model(model, device=device, dtype=dtype),
            style_cache_bytes=style_cache_bytes,
            record_bytes=record_bytes,
            content_cache_bytes=content_cache_bytes,
            feature_store=feature_store,
            max_styles=max_styles,
        )

    @property
    def feature_store(self) -> FeatureStore | None:
        """The shared second tier, or None."""
        return self.features.store

    def fingerprint(self) -> str:
        """The hash of the model's configs and weights that every stored blob must carry.

        Computed once, on first use: it reads every weight (about 150 MB/s on a busy CPU
        core, so tens of seconds for SD 2.1). A server calls it at start so that no job pays.
        """
        return self.features.fingerprint

    def transfer(
        self,
        content: Image.Image,
        style: Image.Image | None = None,
        style_prompt: str | None = None,
        params: TransferParams | None = None,
        progress: ProgressFn | None = None,
        cancelled: CancelledFn | None = None,
    ) -> TransferResult:
        """Restyle ``content`` after a style image, a style prompt, or both.

        The output has the content's aspect ratio, its longer side ``params.size``, sides
        multiples of 64. ``progress(step, total)`` is called after each UNet step with
        ``total = 2 * params.steps``: steps 1..N are the inversion, N+1..2N the sampling
        (``total = params.steps`` when nothing needs inverting: content and style warm).
        ``cancelled()`` is polled before every step; when it returns True the transfer
        stops and :class:`TransferCancelled` is raised. Bad input raises ``ValueError``
        (a :class:`~ham_engine.params.ParamError` names the field).

        ``stats`` holds: ``unet_calls``, ``unet_rows`` (batch rows summed over calls),
        ``unet_rows_by_phase``, ``seconds`` (encode, invert, sample, decode, total),
        ``style_cache_hit`` (None when no image style teacher is used),
        ``style_cache_tier`` (``memory``, ``store`` or None), ``content_cache_hit``,
        ``content_cache_tier``, ``peak_memory_bytes``
        (on CUDA the most memory this transfer allocated; None on a CPU, where no
        per-transfer figure exists), ``process_peak_rss_bytes`` (on a CPU: the process's
        peak resident memory over its whole life, which never falls), ``steps``,
        ``size`` [w, h], ``mode``, ``cfg``, ``device``, ``dtype``, ``model``, ``family``,
        ``inversion``; ``teachers``: how each teacher served the student
        ({"content_teacher": "live" | "recorded" | None, "style_teacher": "live" |
        "recorded" | "cached" | None}; a recorded teacher still runs live at the first
        step); ``record_bytes`` (bytes recorded during inversion), ``record_budget_bytes``
        and ``record_fallback`` (why a wanted recording was not used, else None).
        A latent or image that stops being finite raises :class:`NumericalError`.
        """
        self._validate_style(style)
        batch = self._transfer([Style(style, style_prompt)], content, params, progress, cancelled)
        stats = batch.stats
        only = stats.pop("styles")[0]
        stats.update(only)
        return TransferResult(image=batch.images[0], stats=stats)

    def transfer_batch(
        self,
        content: Image.Image,
        styles: list[StyleSpec],
        params: TransferParams | None = None,
        progress: ProgressFn | None = None,
        cancelled: CancelledFn | None = None,
    ) -> BatchResult:
        """Restyle ``content`` after each of ``styles`` in one run; one image per style, in order.

        A style is an image, a prompt (text), or a :class:`Style` with both; at most
        ``max_styles`` of them. The content is inverted once, together with the cold image
        styles; each sampling step is one UNet batch holding the content teacher once and,
        per style, its teacher (when it is live: not cached, or text-guided) and its
        student. Image ``i`` equals ``transfer(content, styles[i])`` up to float rounding
        (docs/performance.md gives the measured bound). Memory grows with K: the batch of
        a modulated step holds ``1 + 2K`` rows cold, ``1 + K`` warm.
        """
        if not isinstance(styles, (list, tuple)) or not styles:
            raise ParamError("styles", "give a non-empty list of style images and/or prompts")
        if len(styles) > self.max_styles:
            raise ParamError("styles", f"at most {self.max_styles} styles per batch, got {len(styles)}")
        specs = []
        for i, spec in enumerate(styles):
            if isinstance(spec, Style):
                specs.append(spec)
            elif isinstance(spec, Image.Image):
                specs.append(Style(image=spec))
            elif isinstance(spec, str):
                specs.append(Style(prompt=spec))
            else:
                raise ParamError(f"styles[{i}]", f"expected an image, a prompt or a Style, got {type(spec).__name__}")
            self._validate_style(specs[-1].image, f"styles[{i}]")
            try:
                check_style_reference(specs[-1].image is not None, specs[-1].prompt)
            except ParamError as exc:
                raise ParamError(f"styles[{i}]", exc.reason) from exc
        return self._transfer(specs, content, params, progress, cancelled)

    def transfer_latents(
        self,
        content: Image.Image,
        style: Image.Image | None = None,
        style_prompt: str | None = None,
        params: TransferParams | None = None,
        progress: ProgressFn | None = None,
        cancelled: CancelledFn | None = None,
        recorder: AttentionRecorder | None = None,
    ) -> TransferLatents:
        """:meth:`transfer` without the VAE decode, returning latents; ``recorder`` sees each modulated layer call."""
        self._validate_style(style)
        with self._lock, torch.inference_mode():
            students, content_terminal, student_terminals, stats = self._run(
                content, [Style(style, style_prompt)], params, progress, cancelled, recorder
            )
        stats.update(stats.pop("styles")[0])
        return TransferLatents(
            student=students[0],
            content_terminal=content_terminal,
            student_terminal=student_terminals[0],
            stats=stats,
        )

    def _transfer(
        self,
        styles: list[Style],
        content: Image.Image,
        params: TransferParams | None,
        progress: ProgressFn | None,
        cancelled: CancelledFn | None,
    ) -> BatchResult:
        with self._lock, torch.inference_mode():
            started_total = time.perf_counter()
            students, _, _, stats = self._run(content, styles, params, progress, cancelled, recorder=None)
            started = time.perf_counter()
            # One decode per image: each is what its one-style transfer would decode.
            decoded = []
            for z in students:
                pixels = self.model.decode_latents(z)
                _check_finite(pixels, "the decoded image (VAE in float32 unless bf16 on a GPU)")
                decoded.append(images.tensor_to_image(pixels))
            stats["seconds"]["decode"] = self._elapsed(started)
            stats["seconds"]["total"] = self._elapsed(started_total)
            stats.update(self._memory_stats())
        return BatchResult(images=decoded, stats=stats)

    # -- the phases -------------------------------------------------------------------

    @staticmethod
    def _validate_style(style: Image.Image | None, field_name: str = "style") -> None:
        if style is not None and not isinstance(style, Image.Image):
            raise ParamError(field_name, f"expected an image, got {type(style).__name__}")

    def _validate(
        self,
        content: Image.Image,
        styles: list[Style],
        params: TransferParams | None,
        progress: ProgressFn | None = None,
        cancelled: CancelledFn | None = None,
    ) -> _Request:
        if params is None:
            params = TransferParams()
        if not isinstance(params, TransferParams):
            raise ParamError("params", f"expected TransferParams, got {type(params).__name__}")
        for name, callback in (("progress", progress), ("cancelled", cancelled)):
            if callback is not None and not callable(callback):
                raise ParamError(name, f"must be a callable or None, got {type(callback).__name__}")
        validated = []
        for i, spec in enumerate(styles):
            prompt = check_style_reference(spec.image is not None, spec.prompt)
            field_name = "style" if len(styles) == 1 else f"styles[{i}]"
            image = images.to_rgb(spec.image, field=field_name) if spec.image is not None else None
            validated.append(_StyleRequest(image=image, prompt=prompt, guidance=params.guidance))
        content_rgb = images.to_rgb(content, field="content")
        unet = self.model.unet
        family = self.model.family
        gar_patterns = family.default_layers if params.gar_layers == DEFAULT_LAYERS else params.gar_layers
        lat_patterns = family.default_layers if params.lat_layers == DEFAULT_LAYERS else params.lat_layers
        return _Request(
            content=content_rgb,
            styles=tuple(validated),
            params=params,
            size=images.output_size(content_rgb.width, content_rgb.height, params.size),
            gar_layers=resolve_layers(unet, gar_patterns, SELF_ATTENTION, "gar_layers") if params.gar else (),
            lat_layers=resolve_layers(unet, lat_patterns, CROSS_ATTENTION, "lat_layers") if params.lat else (),
        )

    def _style_key(self, request: _Request, style: _StyleRequest) -> StyleKey:
        return StyleKey(
            model=self.model.name,
            image_digest=images.image_digest(style.image),
            size=request.size,
            steps=request.params.steps,
            gar_layers=request.gar_layers,
            lat_layers=request.lat_layers,
            step_window=(request.params.step_start, request.params.step_end),
            style_prompt=style.prompt,
            dtype=str(self.model.dtype),
            device=str(self.model.device),
            inversion=request.params.inversion,
        )

    def _content_key(self, request: _Request) -> ContentKey:
        return ContentKey(
            model=self.model.name,
            image_digest=images.image_digest(request.content, field="content"),
            size=request.size,
            steps=request.params.steps,
            dtype=str(self.model.dtype),
            device=str(self.model.device),
            inversion=request.params.inversion,
        )

    def _cached_style(self, request: _Request, key: StyleKey) -> tuple[StyleFeatures | None, str | None]:
        """What the tiers hold for an image style: the features every modulated step reads."""
        modulated = request.modulated_steps
        gar_entries = {(k, layer) for k in modulated for layer in request.gar_layers}
        lat_layers = set(request.lat_layers) if modulated else set()
        return self.features.style(key, gar_entries, lat_layers)

    def _run(
        self,
        content: Image.Image,
        styles: list[Style],
        params: TransferParams | None,
        progress: ProgressFn | None,
        cancelled: CancelledFn | None,
        recorder: AttentionRecorder | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], dict[str, Any]]:
        """Students' final latents, z_T^c, the students' z_T, and the stats (with per-style ``styles``)."""
        request = self._validate(content, styles, params, progress, cancelled)
        model = self.model
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        counters = _Counters()

        # A cached image style stands in for its style teacher; a text style is never cached.
        image_styles = [s.image is not None and request.uses_style for s in request.styles]
        keys = [
            self._style_key(request, s) if used else None for s, used in zip(request.styles, image_styles, strict=True)
        ]
        found = [self._cached_style(request, key) if key is not None else (None, None) for key in keys]
        cached = [f[0] for f in found]
        invert_styles = [used and hit is None for used, hit in zip(image_styles, cached, strict=True)]
        content_key = self._content_key(request)
        content_cached, content_tier = self.features.content(content_key, latent_shape(model, request.size))
        inverting = content_cached is None or any(invert_styles)
        steps = _StepHooks((2 if inverting else 1) * request.params.steps, progress, cancelled)

        started = time.perf_counter()
        clean, text = self._encode(request, invert_content=content_cached is None, invert_styles=invert_styles)
        schedule = DdimSchedule.from_scheduler(model.scheduler, request.params.steps, model.device)
        counters.seconds["encode"] = self._elapsed(started)
        invert_content = content_cached is None
        recording = self._recording(request, invert_content, invert_styles) if clean is not None else None
        recorded: TeacherRecording | None = None
        records: list[StyleFeatures | None] = []
        try:
            # The content and the cold image styles are inverted together: one batch, empty prompt, no CFG.
            started = time.perf_counter()
            trajectory: list[torch.Tensor] = []
            if clean is not None:
                inversion_text = text.empty.expand(clean.shape[0], -1, -1)

                def invert_model(latents: torch.Tensor, index: int, timestep: torch.Tensor) -> torch.Tensor:
                    if recording is not None:
                        recording.begin_call(index, schedule.steps)
                    output = self._predict(latents, timestep, inversion_text, counters, "invert")
                    if recording is not None:
                        recording.end_call()
                    steps.done()
                    return output

                with recording_attention(model.unet, recording) if recording is not None else nullcontext():
                    trajectory = ddim_invert(
                        invert_model, clean, schedule, before_step=steps.check, convention=request.params.inversion
                    )
            row = 0
            if invert_content:
                content_trajectory = [z[:1] for z in trajectory]
                row = 1
            else:
                content_trajectory = content_cached.latents
            style_trajectories: list[list[torch.Tensor] | None] = []
            style_rows: list[int | None] = []
            for inverted in invert_styles:
                style_trajectories.append([z[row : row + 1] for z in trajectory] if inverted else None)
                style_rows.append(row if inverted else None)
                row += int(inverted)
            counters.seconds["invert"] = self._elapsed(started)

            started = time.perf_counter()
            recorded = recording if recording is not None and recording.active else None
            content_terminal = content_trajectory[0]
            style_latents, student_terminals, stand_ins = [], [], []
            for i, style in enumerate(request.styles):
                latent, style_stats = self._style_start(request, style, cached[i], style_trajectories[i])
                style_latents.append(latent)
                student_terminals.append(
                    sini(content_terminal, *style_stats, request.params.gamma)
                    if request.params.sini
                    else content_terminal
                )
                recorded_style = (
                    recorded.styles.get(style_rows[i]) if recorded is not None and style_rows[i] is not None else None
                )
                stand_ins.append(cached[i] if cached[i] is not None else recorded_style)
                # The cold path of an image style records what a repeat of it will need: the
                # recorded steps' features came from the inversion, the others come live.
                record = None
                if invert_styles[i]:
                    record = recorded_style if recorded_style is not None else StyleFeatures()
                    record.terminal_mean, record.terminal_std = style_stats
                records.append(record)
            context = ModulationContext(
                alpha=request.params.alpha,
                beta=request.params.beta,
                gar_layers=request.gar_layers,
                lat_layers=request.lat_layers,
                cached_styles=tuple(stand_ins),
                style_records=tuple(records),
                recorded_content=recorded.content if recorded is not None else None,
                recorder=recorder,
            )
            branches = _Branches(list(student_terminals), content_trajectory, style_trajectories, style_latents)
            with modulated_attention(model.unet, context):
                students = self._sample(request, schedule, context, branches, text, counters, steps)
        except BaseException:
            if recording is not None:
                recording.discard()  # a cancelled or failed transfer keeps nothing it recorded
            raise
        if recording is not None:
            recording.release()
        # Only a completed run is kept: a cancelled one would leave half-recorded features.
        for key, record in zip(keys, records, strict=True):
            if record is not None:
                self.features.put_style(key, record)
        if invert_content:
            self.features.put_content(content_key, ContentTrajectory(content_trajectory))
        counters.seconds["sample"] = self._elapsed(started)

        width, height = request.size
        stats: dict[str, Any] = {
            "unet_calls": counters.unet_calls,
            "unet_rows": counters.unet_rows,
            "unet_rows_by_phase": dict(counters.rows_by_phase),
            "seconds": counters.seconds,
            "content_cache_hit": content_cached is not None,
            "content_cache_tier": content_tier,
            "styles": [
                {
                    "style_cache_hit": (hit is not None) if used else None,
                    "style_cache_tier": tier,
                    "mode": style.mode,
                    "cfg": style.cfg,
                }
                for style, used, (hit, tier) in zip(request.styles, image_styles, found, strict=True)
            ],
            **self._memory_stats(),
            "steps": request.params.steps,
            "size": [width, height],
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "model": model.name,
            "family": model.family.name,
            "inversion": request.params.inversion,
            "teachers": self._teacher_sources(request, context, cached, recorded),
            "record_bytes": recorded.recorded_bytes if recorded is not None else 0,
            "record_budget_bytes": self.record_bytes,
            "record_fallback": recording.fallback if recording is not None else None,
        }
        return students, content_terminal, student_terminals, stats

    def _recording(
        self, request: _Request, invert_content: bool, invert_styles: list[bool]
    ) -> TeacherRecording | None:
        """What to record of the teachers during inversion, or None when nothing will be.

        The inversion batch is [content?, cold image styles...]. The content teacher is
        recorded at every recordable step when its content is inverted now (a content from
        the cache has no inversion pass: its teacher runs live); an image style teacher
        only when inverted now (not cached) and without a style prompt (its sampling calls
        would be conditioned on the prompt, the inversion's are not).
        """
        steps = request.recordable_steps
        if not steps:
            return None
        style_rows = []
        row = int(invert_content)
        for style, inverted in zip(request.styles, invert_styles, strict=True):
            if inverted and style.prompt is None:
                style_rows.append(row)
            row += int(inverted)
        if not invert_content and not style_rows:
            return None
        return TeacherRecording(
            steps,
            request.gar_layers,
            request.lat_layers,
            budget=self.record_bytes,
            content_row=0 if invert_content else None,
            style_rows=tuple(style_rows),
        )

    @staticmethod
    def _teacher_sources(
        request: _Request,
        context: ModulationContext,
        cached: list[StyleFeatures | None],
        recorded: TeacherRecording | None,
    ) -> dict[str, str | None]:
        """How each teacher served its student: "live", "recorded", "cached", or None (not read).

        Keyed by branch: ``content_teacher``, then each style's teacher (``style_teacher``,
        ``style_teacher.1``, ...).
        """
        content = None
        if request.modulated_steps:
            content = "recorded" if recorded is not None and recorded.content_row is not None else "live"
        sources: dict[str, str | None] = {CONTENT_TEACHER: content}
        for i, style in enumerate(request.styles):
            source = None
            if request.uses_style:
                if cached[i] is not None:
                    source = "cached"
                elif not style.text_guided and context.cached_styles[i] is not None:
                    source = "recorded"
                else:
                    source = "live"
            sources[style_teacher_of(i)] = source
        return sources

    def _encode(
        self, request: _Request, invert_content: bool, invert_styles: list[bool]
    ) -> tuple[torch.Tensor | None, _Text]:
        """Float32 clean latents [content?, cold styles...] (None: nothing to invert), and each distinct prompt once.

        Each image is encoded on its own, so neither depends on what else is encoded
        alongside: a warm (cached style or content) transfer sees the same latents as the
        cold one in every dtype.
        """
        width, height = request.size
        pixels = [images.image_to_tensor(request.content, width, height)] if invert_content else []
        for style, inverted in zip(request.styles, invert_styles, strict=True):
            if inverted:
                pixels.append(images.image_to_tensor(style.image, width, height, fit="cover"))
        clean = None
        if pixels:
            clean = self.model.encode_image(torch.cat(pixels))
            _check_finite(clean, "the VAE encoding of the images")
        # A style teacher's text conditioning matters only where it runs in the sampling batch.
        modulates = bool(request.modulated_steps)
        prompts = [""]
        for style, inverted in zip(request.styles, invert_styles, strict=True):
            runs = style.text_guided or (inverted and modulates)
            if runs and style.prompt and style.prompt not in prompts:
                prompts.append(style.prompt)
        embeddings = self.model.encode_prompt(prompts, size=request.size)
        rows = {prompt: embeddings[i : i + 1] for i, prompt in enumerate(prompts)}
        return clean, _Text(empty=rows[""], styles=tuple(rows.get(s.prompt or "", rows[""]) for s in request.styles))

    def _style_start(
        self,
        request: _Request,
        style: _StyleRequest,
        cached: StyleFeatures | None,
        style_trajectory: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """A text style teacher's seeded noise (else None) and the statistics of z_T^s for SINI.

        The noise is drawn on a CPU generator and then moved, so a seed gives the same
        z_T^s on every device (device generators differ from each other).
        """
        if style.text_guided:
            generator = torch.Generator(device="cpu").manual_seed(request.params.seed)
            shape = (1, self.model.unet.config.in_channels, *self._latent_size(request))
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.model.device)
            return noise, channel_stats(noise, dim=(2, 3))
        if cached is not None:
            return None, (cached.terminal_mean, cached.terminal_std)
        if style_trajectory is not None:
            return None, channel_stats(style_trajectory[0], dim=(2, 3))
        return None, (None, None)

    def _latent_size(self, request: _Request) -> tuple[int, int]:
        width, height = request.size
        return height // self.model.vae_scale_factor, width // self.model.vae_scale_factor

    def _sample(
        self,
        request: _Request,
        schedule: DdimSchedule,
        context: ModulationContext,
        branches: _Branches,
        text: _Text,
        counters: _Counters,
        steps: _StepHooks,
    ) -> list[torch.Tensor]:
        """The sampling loop; returns each student's final latent z_0^m."""
        params = request.params
        modulated = request.modulated_steps
        last_modulated = max(modulated, default=-1)
        conditioning: dict[BranchLayout, PromptEmbeddings] = {}
        for k in range(params.steps):
            steps.check(k)
            modulating = k in modulated
            content_live, live = self._live_teachers(request, context, k, modulating, last_modulated)
            cfg = [style.cfg and live[i] for i, style in enumerate(request.styles)]
            layout = self._layout(content_live, live, cfg, modulating)
            context.begin_step(k, layout, modulating)

            latents = torch.cat([branches.latent(branch, k) for branch, _ in layout.rows])
            if layout not in conditioning:
                conditioning[layout] = self._conditioning(layout, text)
            output = self._predict(latents, schedule.timesteps[k], conditioning[layout], counters, "sample")

            alpha_t, alpha_prev = schedule.alphas_of_step(k)
            student_guidance = params.guidance if params.guide_student else 1.0
            for i, style in enumerate(request.styles):
                branches.students[i] = ddim_step(
                    self._guided(output, layout, student_of(i), student_guidance),
                    branches.students[i],
                    alpha_t,
                    alpha_prev,
                    schedule.prediction_type,
                )
                if style.text_guided and live[i]:
                    branches.style_latents[i] = ddim_step(
                        self._guided(output, layout, style_teacher_of(i), params.guidance),
                        branches.style_latents[i],
                        alpha_t,
                        alpha_prev,
                        schedule.prediction_type,
                    )
            steps.done()
        return branches.students

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _live_teachers(
        request: _Request, context: ModulationContext, k: int, modulating: bool, last_modulated: int
    ) -> tuple[bool, list[bool]]:
        """Which teachers step ``k`` runs in its batch: the content teacher, and per style its teacher.

        A text style teacher walks its own trajectory up to the last step that reads it.
        The content and an image style teacher run only where they are read and nothing
        stands in for them: cached style features, or features recorded during inversion.
        """
        content = modulating and not context.content_held(k)
        styles = [
            (style.text_guided and k <= last_modulated)
            or (not style.text_guided and modulating and not context.style_held(k, i))
            for i, style in enumerate(request.styles)
        ]
        return content, styles

    @staticmethod
    def _layout(content_live: bool, live: list[bool], cfg: list[bool], modulating: bool) -> BranchLayout:
        """The rows of a sampling step: the content teacher (where it runs), then per style its teacher and student.

        Under CFG (some style's live teacher is text-guided) the batch has [uncond | cond]
        halves, and a branch runs once for both where its two rows would be identical (see
        :meth:`_conditioning`: only a CFG style teacher's text differs between the halves):
        the content teacher; a style without CFG, teacher and student; and a CFG style's
        student where it is not modulated (GAR and LAT give its halves different
        statistics and keys).
        """
        branches: list[str] = [CONTENT_TEACHER] if content_live else []
        shared: list[str] = [CONTENT_TEACHER] if content_live else []
        for i, (teacher_live, guided) in enumerate(zip(live, cfg, strict=True)):
            teacher, student = style_teacher_of(i), student_of(i)
            branches += [teacher, student] if teacher_live else [student]
            if not guided:
                shared += [teacher, student] if teacher_live else [student]
            elif not modulating:
                shared.append(student)
        if not any(cfg):
            return BranchLayout(tuple(branches))
        return BranchLayout(tuple(branches), halves=2, shared=tuple(shared))

    @staticmethod
    def _conditioning(layout: BranchLayout, text: _Text) -> PromptEmbeddings:
        """Text conditioning rows for ``layout``: empty for the students and the content teacher.

        A style teacher gets its style prompt (the empty prompt for an image style
        without one); under CFG its uncond row gets the empty prompt.
        """
        teachers = {style_teacher_of(i): t for i, t in enumerate(text.styles)}
        rows = []
        for branch, half in layout.rows:
            uncond = layout.halves == 2 and half == 0 and branch not in layout.shared
            rows.append(teachers[branch] if branch in teachers and not uncond else text.empty)
        return PromptEmbeddings.cat(rows)

    @staticmethod
    def _guided(output: torch.Tensor, layout: BranchLayout, branch: str, guidance: float) -> torch.Tensor:
        """``branch``'s model output, ``[1, ...]``; under CFG: uncond + g · (cond − uncond).

        A branch with one row (no CFG, or one row serving both halves, where cond = uncond)
        gives that row.
        """
        rows = layout.take(output, branch)
        if rows.shape[0] == 1:
            return rows
        return rows[:1] + guidance * (rows[1:] - rows[:1])

    def _predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: PromptEmbeddings,
        counters: _Counters,
        phase: str,
    ) -> torch.Tensor:
        """One UNet call on float32 latents; the output comes back as float32, checked finite."""
        model = self.model
        output = model.unet(latents.to(model.dtype), timestep, **text.unet_kwargs(), return_dict=False)[0]
        counters.unet_calls += 1
        counters.unet_rows += latents.shape[0]
        counters.rows_by_phase[phase] += latents.shape[0]
        output = output.float()
        _check_finite(output, f"the UNet output ({phase}, call {counters.unet_calls}, {model.dtype})")
        return output

    def _elapsed(self, started: float) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter() - started

    def _memory_stats(self) -> dict[str, int | None]:
        """``peak_memory_bytes`` of this transfer (CUDA only) and, on a CPU, the process's lifetime peak RSS."""
        if self.model.device.type == "cuda":
            return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(self.model.device))}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in kilobytes on Linux, bytes on macOS.
        rss = int(peak if sys.platform == "darwin" else peak * 1024)
        return {"peak_memory_bytes": None, "process_peak_rss_bytes": rss}


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NumericalError` naming ``what`` when ``tensor`` holds a NaN or an infinity."""
    if not bool(torch.isfinite(tensor).all()):
        raise NumericalError(
            f"{what} is not finite (NaN or inf): the computation overflowed; on fp16 try HAM_DTYPE=bf16 or fp32"
        )
