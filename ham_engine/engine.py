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
recorded teacher runs only at the first step (see :func:`ham_engine.sampling.live_teachers`). Under
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

:meth:`HamEngine._run` is the phases in order, each a named function: the request is
validated (:mod:`ham_engine.request`) and planned against the caches
(:mod:`ham_engine.plan`); the images and prompts encoded; the inversion run; the students
started (SINI) and sampled (:mod:`ham_engine.sampling`); what a repeat needs persisted; and
the run's :class:`~ham_engine.results.TransferStats` made (:mod:`ham_engine.results`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from PIL import Image

from ham_engine import images
from ham_engine.attention import AttentionRecorder, ModulationContext, modulated_attention
from ham_engine.families import PromptEmbeddings
from ham_engine.feature_cache import ContentTrajectory, FeatureCache
from ham_engine.feature_store import FeatureStore, open_feature_store
from ham_engine.feature_tiers import FeatureTiers
from ham_engine.inversion import DdimSchedule
from ham_engine.loading import DiffusionModel, load_model
from ham_engine.params import TransferParams
from ham_engine.plan import TransferPlan, plan_recording, plan_transfer, teacher_sources
from ham_engine.recording import TeacherRecording, check_record_bytes, default_record_bytes, recording_attention
from ham_engine.request import (
    Style,
    StyleSpec,
    TransferRequest,
    as_styles,
    build_request,
    check_style_image,
)
from ham_engine.results import (
    BatchResult,
    RunCounters,
    StyleStats,
    TransferLatents,
    TransferResult,
    TransferStats,
    memory_stats,
    run_stats,
)
from ham_engine.sampling import Branches, Inversion, Starts, Text, sample, start_students

# Re-exported: callers import the request and result types from here.
__all__ = ["BatchResult", "HamEngine", "NumericalError", "Style", "StyleSpec", "StyleStats", "TransferCancelled",
           "TransferLatents", "TransferResult", "TransferStats"]  # fmt: skip

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
class _Run:
    students: list[torch.Tensor]  # z_0^m per style
    content_terminal: torch.Tensor
    student_terminals: list[torch.Tensor]
    stats: TransferStats


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
        self.style_cache = FeatureCache(style_cache_bytes, field="style_cache_bytes")
        budget = check_record_bytes(record_bytes)
        self.record_bytes = default_record_bytes(model.device) if budget is None else budget
        self.content_cache = FeatureCache(content_cache_bytes, field="content_cache_bytes")
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
        (a :class:`~ham_engine.params.ParamError` names the field). The result's ``stats``
        is a :class:`~ham_engine.results.TransferStats` of one style. A latent or image
        that stops being finite raises :class:`NumericalError`.
        """
        check_style_image(style)
        batch = self._transfer([Style(style, style_prompt)], content, params, progress, cancelled)
        return TransferResult(image=batch.images[0], stats=batch.stats)

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
        return self._transfer(as_styles(styles, self.max_styles), content, params, progress, cancelled)

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
        check_style_image(style)
        with self._lock, torch.inference_mode():
            run = self._run(content, [Style(style, style_prompt)], params, progress, cancelled, recorder)
        return TransferLatents(
            student=run.students[0],
            content_terminal=run.content_terminal,
            student_terminal=run.student_terminals[0],
            stats=run.stats,
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
            run = self._run(content, styles, params, progress, cancelled, recorder=None)
            started = time.perf_counter()
            # One decode per image: each is what its one-style transfer would decode.
            decoded = []
            for z in run.students:
                pixels = self.model.decode_latents(z)
                _check_finite(pixels, "the decoded image (VAE in float32 unless bf16 on a GPU)", self.model.dtype)
                decoded.append(images.tensor_to_image(pixels))
            seconds = {**run.stats.seconds, "decode": self._elapsed(started)}
            seconds["total"] = self._elapsed(started_total)
            stats = replace(run.stats, seconds=seconds, **memory_stats(self.model.device))
        return BatchResult(images=decoded, stats=stats)

    # -- the phases: plan, encode, invert, start the students, sample, persist, stats -------

    def _run(
        self,
        content: Image.Image,
        styles: list[Style],
        params: TransferParams | None,
        progress: ProgressFn | None,
        cancelled: CancelledFn | None,
        recorder: AttentionRecorder | None,
    ) -> _Run:
        """The students' final latents, z_T^c, the students' z_T, and the stats."""
        request = build_request(self.model, content, styles, params, progress, cancelled)
        if self.model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.model.device)
        plan = plan_transfer(request, self.model, self.features)
        counters = RunCounters()
        steps = _StepHooks((2 if plan.inverting else 1) * request.params.steps, progress, cancelled)
        started = time.perf_counter()
        clean, text = self._encode(request, plan)
        schedule = self.model.schedule(request.params.steps, request.size)
        counters.seconds["encode"] = self._elapsed(started)
        recording = plan_recording(request, plan, self.record_bytes) if clean is not None else None
        try:
            started = time.perf_counter()
            inversion = self._invert(request, plan, clean, text, schedule, recording, counters, steps)
            counters.seconds["invert"] = self._elapsed(started)
            started = time.perf_counter()
            recorded = recording if recording is not None and recording.active else None
            starts = start_students(self.model, request, plan, inversion, recorded)
            context = self._context(request, starts, recorded, recorder)
            branches = Branches(starts.student_terminals[:], inversion.content, inversion.styles, starts.style_latents)
            predict = partial(self._predict, counters=counters, phase="sample")
            with modulated_attention(self.model.unet, context):
                students = sample(request, schedule, context, branches, text, predict, steps.check, steps.done)
        except BaseException:
            if recording is not None:
                recording.discard()  # a cancelled or failed transfer keeps nothing it recorded
            raise
        if recording is not None:
            recording.release()
        self._persist_features(plan, starts, inversion)
        counters.seconds["sample"] = self._elapsed(started)
        teachers = teacher_sources(request, plan, starts.stand_ins, recorded)
        stats = run_stats(self.model, request, plan, counters, teachers, recording, self.record_bytes)
        return _Run(students, inversion.content[0], starts.student_terminals, stats)

    def _encode(self, request: TransferRequest, plan: TransferPlan) -> tuple[torch.Tensor | None, Text]:
        """Float32 clean latents [content?, cold styles...] (None: nothing to invert), and each distinct prompt once.

        Each image is encoded on its own, so neither depends on what else is encoded
        alongside: a warm (cached style or content) transfer sees the same latents as the
        cold one in every dtype.
        """
        width, height = request.size
        pixels = [images.image_to_tensor(request.content, width, height)] if plan.invert_content else []
        for style, inverted in zip(request.styles, plan.invert_styles, strict=True):
            if inverted:
                pixels.append(images.image_to_tensor(style.image, width, height, fit="cover"))
        clean = None
        if pixels:
            clean = self.model.encode_image(torch.cat(pixels))
            _check_finite(clean, "the VAE encoding of the images", self.model.dtype)
        # A style teacher's text conditioning matters only where it runs in the sampling batch.
        modulates = bool(request.modulated_steps)
        prompts = [""]
        for style, inverted in zip(request.styles, plan.invert_styles, strict=True):
            runs = style.text_guided or (inverted and modulates)
            if runs and style.prompt and style.prompt not in prompts:
                prompts.append(style.prompt)
        embeddings = self.model.encode_prompt(prompts, size=request.size)
        rows = {prompt: embeddings[i : i + 1] for i, prompt in enumerate(prompts)}
        return clean, Text(empty=rows[""], styles=tuple(rows.get(s.prompt or "", rows[""]) for s in request.styles))

    def _invert(
        self,
        request: TransferRequest,
        plan: TransferPlan,
        clean: torch.Tensor | None,
        text: Text,
        schedule: DdimSchedule,
        recording: TeacherRecording | None,
        counters: RunCounters,
        steps: _StepHooks,
    ) -> Inversion:
        """DDIM-invert the content and the cold image styles together: one batch, empty prompt, no CFG."""
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

            with recording_attention(self.model.unet, recording) if recording is not None else nullcontext():
                trajectory = schedule.invert(
                    invert_model, clean, before_step=steps.check, convention=request.params.inversion
                )
        row = int(plan.invert_content)
        content = [z[:1] for z in trajectory] if plan.invert_content else plan.content_cached.latents
        styles: list[list[torch.Tensor] | None] = []
        style_rows: list[int | None] = []
        for inverted in plan.invert_styles:
            styles.append([z[row : row + 1] for z in trajectory] if inverted else None)
            style_rows.append(row if inverted else None)
            row += int(inverted)
        return Inversion(content, styles, style_rows)

    @staticmethod
    def _context(
        request: TransferRequest, starts: Starts, recorded: TeacherRecording | None, recorder: AttentionRecorder | None
    ) -> ModulationContext:
        """What GAR and LAT read during sampling: the blends, the layers, and what stands in for the teachers."""
        return ModulationContext(
            alpha=request.params.alpha,
            beta=request.params.beta,
            gar_layers=request.gar_layers,
            lat_layers=request.lat_layers,
            cached_styles=starts.stand_ins,
            style_records=starts.records,
            recorded_content=recorded.content if recorded is not None else None,
            recorder=recorder,
        )

    def _persist_features(self, plan: TransferPlan, starts: Starts, inversion: Inversion) -> None:
        """Keep what a completed run computed for repeats: cold image styles' features, a fresh content's inversion.

        Only a completed run gets here: a cancelled one would leave half-recorded features.
        """
        for key, record in zip(plan.style_keys, starts.records, strict=True):
            if record is not None:
                self.features.put_style(key, record)
        if plan.invert_content:
            self.features.put_content(plan.content_key, ContentTrajectory(inversion.content))

    def _predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: PromptEmbeddings,
        counters: RunCounters,
        phase: str,
    ) -> torch.Tensor:
        """One UNet call on float32 latents; the output comes back as float32, checked finite."""
        model = self.model
        output = model.unet(latents.to(model.dtype), timestep, **text.unet_kwargs(), return_dict=False)[0]
        counters.unet_calls += 1
        counters.unet_rows += latents.shape[0]
        counters.rows_by_phase[phase] += latents.shape[0]
        output = output.float()
        _check_finite(output, f"the UNet output ({phase}, call {counters.unet_calls}, {model.dtype})", model.dtype)
        return output

    def _elapsed(self, started: float) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter() - started


# What to try when a model running in this dtype overflows: only a wider dtype helps.
_OVERFLOW_ADVICE = {
    torch.float16: "the model runs in fp16: try HAM_DTYPE=bf16 or fp32",
    torch.bfloat16: "the model runs in bf16: try HAM_DTYPE=fp32",
}


def _check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """Raise :class:`NumericalError` naming ``what`` when ``tensor`` holds a NaN or an infinity.

    ``dtype`` is the model's: the advice names a wider one only where there is one.
    """
    if not bool(torch.isfinite(tensor).all()):
        advice = _OVERFLOW_ADVICE.get(dtype, "the model already runs in fp32: check its weights and the inputs")
        raise NumericalError(f"{what} is not finite (NaN or inf): the computation overflowed; {advice}")
