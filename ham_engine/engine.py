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
    STUDENT,
    STYLE_TEACHER,
    AttentionRecorder,
    BranchLayout,
    ModulationContext,
    modulated_attention,
    resolve_layers,
)
from ham_engine.families import PromptEmbeddings
from ham_engine.inversion import DdimSchedule, ddim_invert, ddim_step
from ham_engine.loading import DiffusionModel, load_model
from ham_engine.modulation import channel_stats, sini
from ham_engine.params import DEFAULT_LAYERS, ParamError, TransferParams, check_style_reference
from ham_engine.recording import TeacherRecording, check_record_bytes, default_record_bytes, recording_attention
from ham_engine.style_cache import StyleCache, StyleFeatures, StyleKey

DEFAULT_STYLE_CACHE_BYTES = 256 * 2**20

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
class TransferLatents:
    """The latent-space result of a transfer (before VAE decoding), for tests and analysis."""

    student: torch.Tensor  # z_0^m, float32 [1, C, h, w]
    content_terminal: torch.Tensor  # z_T^c, the inverted content latent
    student_terminal: torch.Tensor  # z_T^m, after SINI
    stats: dict[str, Any]


@dataclass(frozen=True)
class _Request:
    """A validated transfer request."""

    content: Image.Image  # RGB
    style: Image.Image | None  # RGB
    style_prompt: str | None
    params: TransferParams
    size: tuple[int, int]  # (width, height) of the output
    gar_layers: tuple[str, ...]  # resolved module names, () when GAR is off
    lat_layers: tuple[str, ...]

    @property
    def text_guided(self) -> bool:
        """The style teacher is sampled from noise with the style prompt (no style image)."""
        return self.style is None

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance on the style teacher (text-guided only; 1.0 is a no-op)."""
        return self.text_guided and self.params.guidance > 1.0

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
    """Encoded prompts: the empty one, and the style teacher's (the empty one when it has none)."""

    empty: PromptEmbeddings
    style: PromptEmbeddings


@dataclass
class _Branches:
    """The latents the three branches enter each sampling step with."""

    student: torch.Tensor
    content_trajectory: list[torch.Tensor]
    style_trajectory: list[torch.Tensor] | None  # an inverted image style
    style_latent: torch.Tensor | None  # a text style teacher's own, advancing latent

    def latent(self, branch: str, k: int) -> torch.Tensor:
        """``branch``'s latent at step ``k``; teachers are re-anchored to their stored trajectories."""
        if branch == STUDENT:
            return self.student
        if branch == CONTENT_TEACHER:
            return self.content_trajectory[k]
        return self.style_trajectory[k] if self.style_trajectory is not None else self.style_latent


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

    ``transfer`` is thread-safe: a lock keeps two threads from sharing the UNet. The
    style cache keeps what repeat image styles need (docs/method.md §7). ``record_bytes``
    bounds what one transfer may record of its teachers during inversion (None: a share of
    the device's memory, :func:`~ham_engine.recording.default_record_bytes`; 0: never
    record); a transfer whose recording would not fit runs its teachers live.
    """

    def __init__(
        self,
        model: DiffusionModel,
        style_cache_bytes: int = DEFAULT_STYLE_CACHE_BYTES,
        record_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.style_cache = StyleCache(style_cache_bytes)
        budget = check_record_bytes(record_bytes)
        self.record_bytes = default_record_bytes(model.device) if budget is None else budget
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str = "tiny",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        style_cache_bytes: int = DEFAULT_STYLE_CACHE_BYTES,
        record_bytes: int | None = None,
    ) -> HamEngine:
        """Load ``model`` ("tiny", "tiny-v", an HF id or a local folder) and wrap it in an engine."""
        check_record_bytes(record_bytes)  # before the load, which takes long
        return cls(
            load_model(model, device=device, dtype=dtype),
            style_cache_bytes=style_cache_bytes,
            record_bytes=record_bytes,
        )

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
        ``total = 2 * params.steps``: steps 1..N are the inversion, N+1..2N the sampling.
        ``cancelled()`` is polled before every step; when it returns True the transfer
        stops and :class:`TransferCancelled` is raised. Bad input raises ``ValueError``
        (a :class:`~ham_engine.params.ParamError` names the field).

        ``stats`` holds: ``unet_calls``, ``unet_rows`` (batch rows summed over calls),
        ``unet_rows_by_phase``, ``seconds`` (encode, invert, sample, decode, total),
        ``style_cache_hit`` (None when no image style teacher is used), ``peak_memory_bytes``
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
        with self._lock, torch.inference_mode():
            started_total = time.perf_counter()
            latents = self._run(content, style, style_prompt, params, progress, cancelled, recorder=None)
            started = time.perf_counter()
            pixels = self.model.decode_latents(latents.student)
            _check_finite(pixels, "the decoded image (VAE in float32 unless bf16 on a GPU)")
            image = images.tensor_to_image(pixels)
            stats = latents.stats
            stats["seconds"]["decode"] = self._elapsed(started)
            stats["seconds"]["total"] = self._elapsed(started_total)
            stats.update(self._memory_stats())
        return TransferResult(image=image, stats=stats)

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
        with self._lock, torch.inference_mode():
            return self._run(content, style, style_prompt, params, progress, cancelled, recorder)

    # -- the phases -------------------------------------------------------------------

    def _validate(
        self,
        content: Image.Image,
        style: Image.Image | None,
        style_prompt: str | None,
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
        if style is not None and not isinstance(style, Image.Image):
            raise ParamError("style", f"expected an image, got {type(style).__name__}")
        prompt = check_style_reference(style is not None, style_prompt)
        content_rgb = images.to_rgb(content, field="content")
        style_rgb = images.to_rgb(style, field="style") if style is not None else None
        unet = self.model.unet
        family = self.model.family
        gar_patterns = family.default_layers if params.gar_layers == DEFAULT_LAYERS else params.gar_layers
        lat_patterns = family.default_layers if params.lat_layers == DEFAULT_LAYERS else params.lat_layers
        return _Request(
            content=content_rgb,
            style=style_rgb,
            style_prompt=prompt,
            params=params,
            size=images.output_size(content_rgb.width, content_rgb.height, params.size),
            gar_layers=resolve_layers(unet, gar_patterns, SELF_ATTENTION, "gar_layers") if params.gar else (),
            lat_layers=resolve_layers(unet, lat_patterns, CROSS_ATTENTION, "lat_layers") if params.lat else (),
        )

    def _style_key(self, request: _Request) -> StyleKey:
        return StyleKey(
            model=self.model.name,
            image_digest=images.image_digest(request.style),
            size=request.size,
            steps=request.params.steps,
            gar_layers=request.gar_layers,
            lat_layers=request.lat_layers,
            step_window=(request.params.step_start, request.params.step_end),
            style_prompt=request.style_prompt,
            dtype=str(self.model.dtype),
            device=str(self.model.device),
            inversion=request.params.inversion,
        )

    def _run(
        self,
        content: Image.Image,
        style: Image.Image | None,
        style_prompt: str | None,
        params: TransferParams | None,
        progress: ProgressFn | None,
        cancelled: CancelledFn | None,
        recorder: AttentionRecorder | None,
    ) -> TransferLatents:
        request = self._validate(content, style, style_prompt, params, progress, cancelled)
        model = self.model
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        counters = _Counters()
        steps = _StepHooks(2 * request.params.steps, progress, cancelled)

        # A cached image style stands in for the style teacher; a text style is never cached.
        image_style = request.style is not None and request.uses_style
        key = self._style_key(request) if image_style else None
        cached = self.style_cache.get(key) if key is not None else None
        invert_style = image_style and cached is None

        started = time.perf_counter()
        clean, text = self._encode(request, invert_style)
        schedule = DdimSchedule.from_scheduler(model.scheduler, request.params.steps, model.device)
        counters.seconds["encode"] = self._elapsed(started)
        recording = self._recording(request, invert_style)
        try:
            # Content and style are inverted together: one batch, empty prompt, no CFG.
            started = time.perf_counter()
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
            content_trajectory = [z[:1] for z in trajectory]
            style_trajectory = [z[1:] for z in trajectory] if invert_style else None
            counters.seconds["invert"] = self._elapsed(started)

            started = time.perf_counter()
            style_latent, style_stats = self._style_start(request, cached, style_trajectory)
            content_terminal = content_trajectory[0]
            student_terminal = (
                sini(content_terminal, *style_stats, request.params.gamma) if request.params.sini else content_terminal
            )
            recorded = recording if recording is not None and recording.active else None
            recorded_style = recorded.styles.get(1) if recorded is not None else None
            # The cold path of an image style records what a repeat of it will need: the
            # recorded steps' features came from the inversion, the others come live.
            style_record = None
            if invert_style:
                style_record = recorded_style if recorded_style is not None else StyleFeatures()
                style_record.terminal_mean, style_record.terminal_std = style_stats
            context = ModulationContext(
                alpha=request.params.alpha,
                beta=request.params.beta,
                gar_layers=request.gar_layers,
                lat_layers=request.lat_layers,
                cached_style=cached if cached is not None else recorded_style,
                style_record=style_record,
                recorded_content=recorded.content if recorded is not None else None,
                recorder=recorder,
            )
            branches = _Branches(student_terminal, content_trajectory, style_trajectory, style_latent)
            with modulated_attention(model.unet, context):
                student = self._sample(request, schedule, context, branches, text, counters, steps)
        except BaseException:
            if recording is not None:
                recording.discard()  # a cancelled or failed transfer keeps nothing it recorded
            raise
        if recording is not None:
            recording.release()
        if style_record is not None:
            self.style_cache.put(key, style_record)
        counters.seconds["sample"] = self._elapsed(started)

        width, height = request.size
        stats: dict[str, Any] = {
            "unet_calls": counters.unet_calls,
            "unet_rows": counters.unet_rows,
            "unet_rows_by_phase": dict(counters.rows_by_phase),
            "seconds": counters.seconds,
            "style_cache_hit": (cached is not None) if image_style else None,
            **self._memory_stats(),
            "steps": request.params.steps,
            "size": [width, height],
            "mode": "text" if request.text_guided else ("image+text" if request.style_prompt else "image"),
            "cfg": request.cfg,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "model": model.name,
            "family": model.family.name,
            "inversion": request.params.inversion,
            "teachers": self._teacher_sources(request, cached, recorded),
            "record_bytes": recorded.recorded_bytes if recorded is not None else 0,
            "record_budget_bytes": self.record_bytes,
            "record_fallback": recording.fallback if recording is not None else None,
        }
        return TransferLatents(
            student=student, content_terminal=content_terminal, student_terminal=student_terminal, stats=stats
        )

    def _recording(self, request: _Request, invert_style: bool) -> TeacherRecording | None:
        """What to record of the teachers during inversion, or None when nothing will be.

        The content teacher is recorded at every recordable step; an image style teacher
        only when inverted now (not cached) and without a style prompt (its sampling calls
        would be conditioned on the prompt, the inversion's are not).
        """
        steps = request.recordable_steps
        if not steps:
            return None
        return TeacherRecording(
            steps,
            request.gar_layers,
            request.lat_layers,
            budget=self.record_bytes,
            content_row=0,
            style_rows=(1,) if invert_style and request.style_prompt is None else (),
        )

    @staticmethod
    def _teacher_sources(
        request: _Request, cached: StyleFeatures | None, recorded: TeacherRecording | None
    ) -> dict[str, str | None]:
        """How each teacher served the student: "live", "recorded", "cached", or None (not read)."""
        content = None
        if request.modulated_steps:
            content = "recorded" if recorded is not None else "live"
        style = None
        if request.uses_style:
            if cached is not None:
                style = "cached"
            elif recorded is not None and recorded.styles:
                style = "recorded"
            else:
                style = "live"
        return {CONTENT_TEACHER: content, STYLE_TEACHER: style}

    def _encode(self, request: _Request, invert_style: bool) -> tuple[torch.Tensor, _Text]:
        """Float32 clean latents [content(, style)], each image encoded on its own, and each distinct prompt once.

        Neither depends on what else is encoded alongside, so a warm (cached style)
        transfer sees the same content latent as the cold one in every dtype.
        """
        width, height = request.size
        pixels = [images.image_to_tensor(request.content, width, height)]
        if invert_style:
            pixels.append(images.image_to_tensor(request.style, width, height, fit="cover"))
        clean = self.model.encode_image(torch.cat(pixels))
        _check_finite(clean, "the VAE encoding of the images")
        # The style teacher's text conditioning matters only where it runs in the sampling batch.
        style_runs = request.text_guided or (invert_style and bool(request.modulated_steps))
        prompts = [""] + ([request.style_prompt] if style_runs and request.style_prompt else [])
        embeddings = self.model.encode_prompt(prompts, size=request.size)
        return clean, _Text(empty=embeddings[:1], style=embeddings[1:] if len(prompts) > 1 else embeddings[:1])

    def _style_start(
        self, request: _Request, cached: StyleFeatures | None, style_trajectory: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The text style teacher's seeded noise (else None) and the statistics of z_T^s for SINI.

        The noise is drawn on a CPU generator and then moved, so a seed gives the same
        z_T^s on every device (device generators differ from each other).
        """
        if request.text_guided:
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
    ) -> torch.Tensor:
        """The sampling loop; returns the student's final latent z_0^m."""
        params = request.params
        modulated = request.modulated_steps
        last_modulated = max(modulated, default=-1)
        conditioning: dict[BranchLayout, PromptEmbeddings] = {}
        for k in range(params.steps):
            steps.check(k)
            modulating = k in modulated
            teachers = self._live_teachers(request, context, k, modulating, last_modulated)
            style_live = STYLE_TEACHER in teachers
            layout = self._layout((*teachers, STUDENT), cfg=request.cfg and style_live, modulating=modulating)
            context.begin_step(k, layout, modulating)

            latents = torch.cat([branches.latent(branch, k) for branch, _ in layout.rows])
            if layout not in conditioning:
                conditioning[layout] = self._conditioning(layout, text)
            output = self._predict(latents, schedule.timesteps[k], conditioning[layout], counters, "sample")

            alpha_t, alpha_prev = schedule.alphas_of_step(k)
            branches.student = ddim_step(
                self._guided(output, layout, STUDENT, params.guidance if params.guide_student else 1.0),
                branches.student,
                alpha_t,
                alpha_prev,
                schedule.prediction_type,
            )
            if request.text_guided and style_live:
                branches.style_latent = ddim_step(
                    self._guided(output, layout, STYLE_TEACHER, params.guidance),
                    branches.style_latent,
                    alpha_t,
                    alpha_prev,
                    schedule.prediction_type,
                )
            steps.done()
        return branches.student

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _live_teachers(
        request: _Request, context: ModulationContext, k: int, modulating: bool, last_modulated: int
    ) -> tuple[str, ...]:
        """The teachers step ``k`` runs in its batch.

        A text style teacher walks its own trajectory up to the last step that reads it.
        The content and an image style teacher run only where they are read and nothing
        stands in for them: cached style features, or features recorded during inversion.
        """
        content = modulating and not context.content_held(k)
        style = (request.text_guided and k <= last_modulated) or (
            not request.text_guided and modulating and not context.style_held(k)
        )
        return ((CONTENT_TEACHER,) if content else ()) + ((STYLE_TEACHER,) if style else ())

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

    @staticmethod
    def _layout(branches: tuple[str, ...], cfg: bool, modulating: bool) -> BranchLayout:
        """The rows of a sampling step running ``branches``, as [uncond | cond] halves under CFG.

        A branch runs once for both halves where its two rows would be identical (see
        :meth:`_conditioning`: only the style teacher's text differs between the halves):
        the content teacher, and the student where it is not modulated (GAR and LAT give
        its halves different statistics and keys).
        """
        if not cfg:
            return BranchLayout(branches)
        shared = (CONTENT_TEACHER,) + (() if modulating else (STUDENT,))
        return BranchLayout(branches, halves=2, shared=tuple(b for b in branches if b in shared))

    @staticmethod
    def _conditioning(layout: BranchLayout, text: _Text) -> PromptEmbeddings:
        """Text conditioning rows for ``layout``: empty for the student and the content teacher.

        The style teacher gets the style prompt (the empty prompt for an image style
        without one); under CFG its uncond half gets the empty prompt.
        """
        rows = []
        for branch, half in layout.rows:
            uncond = layout.halves == 2 and half == 0
            rows.append(text.style if branch == STYLE_TEACHER and not uncond else text.empty)
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
