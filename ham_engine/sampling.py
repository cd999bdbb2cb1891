"""The sampling phase: each step one UNet batch of the branches that step needs.

:func:`sample` runs the loop. :func:`live_teachers` says which teachers the step
must run (a branch that nothing reads is left out); :func:`step_layout` orders the rows,
with [uncond | cond] halves under CFG and one row for a branch whose two halves would be
identical; :func:`conditioning` gives each row its text, and :func:`guided` a branch's
output. :class:`Branches` holds the latent each branch enters a step with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ham_engine.attention import CONTENT_TEACHER, BranchLayout, ModulationContext, student_of, style_teacher_of
from ham_engine.families import PromptEmbeddings
from ham_engine.feature_cache import StyleFeatures
from ham_engine.inversion import DdimSchedule
from ham_engine.loading import DiffusionModel
from ham_engine.modulation import channel_stats, sini
from ham_engine.plan import TransferPlan
from ham_engine.recording import TeacherRecording
from ham_engine.request import StyleRequest, TransferRequest

# One UNet call: (latents, timestep, text) -> the float32 model output.
PredictFn = Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor]


@dataclass(frozen=True)
class Text:
    """Encoded prompts: the empty one, and each style teacher's (the empty one when it has none)."""

    empty: PromptEmbeddings
    styles: tuple[PromptEmbeddings, ...]


@dataclass
class Branches:
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


@dataclass
class Inversion:
    """The inversion phase's result: the content's trajectory and, per style, its own (None: not inverted now)."""

    content: list[torch.Tensor]  # entry k is the latent sampling step k starts from; entry 0 is z_T^c
    styles: list[list[torch.Tensor] | None]
    style_rows: list[int | None]  # the style's row in the inversion batch


@dataclass
class Starts:
    """Where each style's branches start: its teacher's noise (text styles), its student's z_T, its stand-in."""

    style_latents: list[torch.Tensor | None]
    student_terminals: list[torch.Tensor]
    stand_ins: tuple[StyleFeatures | None, ...]  # cached or recorded features in place of the style teacher
    records: tuple[StyleFeatures | None, ...]  # what a cold image style keeps for its repeats


def start_students(
    model: DiffusionModel,
    request: TransferRequest,
    plan: TransferPlan,
    inversion: Inversion,
    recorded: TeacherRecording | None,
) -> Starts:
    """Each student's z_T (SINI), each text style teacher's noise, and what stands in for each style teacher."""
    content_terminal = inversion.content[0]
    style_latents, terminals, stand_ins, records = [], [], [], []
    for i, style in enumerate(request.styles):
        latent, style_stats = style_start(model, request, style, plan.cached[i], inversion.styles[i])
        style_latents.append(latent)
        terminals.append(
            sini(content_terminal, *style_stats, request.params.gamma) if request.params.sini else content_terminal
        )
        row = inversion.style_rows[i]
        recorded_style = recorded.styles.get(row) if recorded is not None and row is not None else None
        stand_ins.append(plan.cached[i] if plan.cached[i] is not None else recorded_style)
        # The cold path of an image style records what a repeat of it will need: the
        # recorded steps' features came from the inversion, the others come live.
        record = None
        if plan.invert_styles[i]:
            record = recorded_style if recorded_style is not None else StyleFeatures()
            record.terminal_mean, record.terminal_std = style_stats
        records.append(record)
    return Starts(style_latents, terminals, tuple(stand_ins), tuple(records))


def style_start(
    model: DiffusionModel,
    request: TransferRequest,
    style: StyleRequest,
    cached: StyleFeatures | None,
    style_trajectory: list[torch.Tensor] | None,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """A text style teacher's seeded noise (else None) and the statistics of z_T^s for SINI.

    The noise is drawn on a CPU generator and then moved, so a seed gives the same
    z_T^s on every device (device generators differ from each other).
    """
    if style.text_guided:
        generator = torch.Generator(device="cpu").manual_seed(request.params.seed)
        width, height = request.size
        scale = model.vae_scale_factor
        shape = (1, model.unet.config.in_channels, height // scale, width // scale)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
        return noise, channel_stats(noise, dim=(2, 3))
    if cached is not None:
        return None, (cached.terminal_mean, cached.terminal_std)
    if style_trajectory is not None:
        return None, channel_stats(style_trajectory[0], dim=(2, 3))
    return None, (None, None)


def live_teachers(
    request: TransferRequest, context: ModulationContext, k: int, modulating: bool, last_modulated: int
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


def step_layout(content_live: bool, live: list[bool], cfg: list[bool], modulating: bool) -> BranchLayout:
    """The rows of a sampling step: the content teacher (where it runs), then per style its teacher and student.

    Under CFG (some style's live teacher is text-guided) the batch has [uncond | cond]
    halves, and a branch runs once for both where its two rows would be identical (see
    :func:`conditioning`: only a CFG style teacher's text differs between the halves):
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


def conditioning(layout: BranchLayout, text: Text) -> PromptEmbeddings:
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


def guided(output: torch.Tensor, layout: BranchLayout, branch: str, guidance: float) -> torch.Tensor:
    """``branch``'s model output, ``[1, ...]``; under CFG: uncond + g · (cond − uncond).

    A branch with one row (no CFG, or one row serving both halves, where cond = uncond)
    gives that row.
    """
    rows = layout.take(output, branch)
    if rows.shape[0] == 1:
        return rows
    return rows[:1] + guidance * (rows[1:] - rows[:1])


def sample(
    request: TransferRequest,
    schedule: DdimSchedule,
    context: ModulationContext,
    branches: Branches,
    text: Text,
    predict: PredictFn,
    before_step: Callable[[int], None],
    after_step: Callable[[], None],
) -> list[torch.Tensor]:
    """The sampling loop; returns each student's final latent z_0^m."""
    modulated = request.modulated_steps
    last_modulated = max(modulated, default=-1)
    text_rows: dict[BranchLayout, PromptEmbeddings] = {}
    for k in range(request.params.steps):
        before_step(k)
        modulating = k in modulated
        content_live, live = live_teachers(request, context, k, modulating, last_modulated)
        cfg = [style.cfg and live[i] for i, style in enumerate(request.styles)]
        layout = step_layout(content_live, live, cfg, modulating)
        context.begin_step(k, layout, modulating)

        latents = torch.cat([branches.latent(branch, k) for branch, _ in layout.rows])
        if layout not in text_rows:
            text_rows[layout] = conditioning(layout, text)
        output = predict(latents, schedule.timesteps[k], text_rows[layout])
        step_branches(request, schedule, k, output, layout, live, branches)
        after_step()
    return branches.students


def step_branches(
    request: TransferRequest,
    schedule: DdimSchedule,
    k: int,
    output: torch.Tensor,
    layout: BranchLayout,
    live: list[bool],
    branches: Branches,
) -> None:
    """Advance each student, and each live text style teacher, by one step of ``schedule`` from ``output``."""
    params = request.params
    student_guidance = params.guidance if params.guide_student else 1.0
    for i, style in enumerate(request.styles):
        # The schedule's own step: DDIM, or flow-matching Euler for a transformer (ham_engine.flow).
        branches.students[i] = schedule.step(
            guided(output, layout, student_of(i), student_guidance), branches.students[i], k
        )
        if style.text_guided and live[i]:
            branches.style_latents[i] = schedule.step(
                guided(output, layout, style_teacher_of(i), params.guidance), branches.style_latents[i], k
            )
