"""What a transfer returns: the images (or latents) and a typed account of what the run cost.

:class:`TransferStats` is the one shape of a run's stats, for one style or K. A worker
stores it in the job record as JSON through :meth:`TransferStats.to_dict`, the only place
its JSON form is written. Importing this module does not import torch: the worker's
torch-free parts (metrics) and tests build these types too.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ham_engine.loading import DiffusionModel
    from ham_engine.plan import TransferPlan
    from ham_engine.recording import TeacherRecording
    from ham_engine.request import TransferRequest

# The keys of TransferStats.seconds, in the order a transfer passes them; "decode" and
# "total" only once the images are decoded (TransferLatents stops before).
PHASES = ("encode", "invert", "sample", "decode", "total")


@dataclass(frozen=True)
class StyleStats:
    """What one style of a run cost.

    ``style_cache_hit``: whether an image style's features came from the cache (None when
    no image style teacher is read: a text style, or nothing reads the style); its
    ``style_cache_tier``: ``memory``, ``store`` or None; ``mode``: ``image``, ``text`` or
    ``image+text``; ``cfg``: whether the style teacher ran under classifier-free guidance.
    """

    style_cache_hit: bool | None
    style_cache_tier: str | None
    mode: str
    cfg: bool


@dataclass(frozen=True)
class TransferStats:
    """What one run (one content, K styles) cost and how it was served.

    Attributes:
        unet_calls: UNet forward calls, inversion and sampling.
        unet_rows: batch rows summed over those calls.
        unet_rows_by_phase: the rows per phase, ``{"invert": ..., "sample": ...}``.
        seconds: wall seconds per phase, keyed by :data:`PHASES` (``decode`` and ``total``
            once decoded).
        content_cache_hit: whether the content's inversion came from the cache.
        content_cache_tier: ``memory``, ``store`` or None.
        styles: per style, in the order given, its :class:`StyleStats`.
        steps: DDIM steps; ``size``: the output (width, height).
        device, dtype, model, family: what ran it (``dtype`` without ``torch.``).
        inversion: the inversion convention (``target`` or ``source``).
        teachers: how each teacher served its student, keyed by branch
            (``content_teacher``, ``style_teacher``, ``style_teacher.1``, ...): ``live``,
            ``recorded``, ``cached``, or None when nothing read it; a recorded teacher
            still runs live at the first step.
        record_bytes: bytes recorded of the teachers during inversion;
            ``record_budget_bytes`` the engine's budget for it; ``record_fallback`` why a
            wanted recording was not used, else None.
        peak_memory_bytes: on CUDA the most memory this transfer allocated; None on a CPU,
            where no per-transfer figure exists (and for :class:`TransferLatents`).
        process_peak_rss_bytes: on a CPU, the process's peak resident memory over its
            whole life (it never falls); None on CUDA.
    """

    unet_calls: int
    unet_rows: int
    unet_rows_by_phase: dict[str, int]
    seconds: dict[str, float]
    content_cache_hit: bool
    content_cache_tier: str | None
    styles: tuple[StyleStats, ...]
    steps: int
    size: tuple[int, int]
    device: str
    dtype: str
    model: str
    family: str
    inversion: str
    teachers: dict[str, str | None]
    record_bytes: int
    record_budget_bytes: int
    record_fallback: str | None
    peak_memory_bytes: int | None = None
    process_peak_rss_bytes: int | None = None

    @property
    def style(self) -> StyleStats:
        """The one style of a one-style run (``transfer``); a K-style run has ``styles``."""
        if len(self.styles) != 1:
            raise ValueError(f"stats: a run of {len(self.styles)} styles has no one style; read styles[i]")
        return self.styles[0]

    @property
    def style_cache_hit(self) -> bool | None:
        """The one style's :attr:`StyleStats.style_cache_hit`."""
        return self.style.style_cache_hit

    @property
    def style_cache_tier(self) -> str | None:
        """The one style's :attr:`StyleStats.style_cache_tier`."""
        return self.style.style_cache_tier

    @property
    def mode(self) -> str:
        """The one style's :attr:`StyleStats.mode`."""
        return self.style.mode

    @property
    def cfg(self) -> bool:
        """The one style's :attr:`StyleStats.cfg`."""
        return self.style.cfg

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a job record's ``stats``, ``ham transfer --stats``).

        One style: its fields at the top level, the shape a one-style job record has
        always had; K styles: a ``styles`` list of them. ``size`` is a list;
        ``process_peak_rss_bytes`` is left out on CUDA, where it is None.
        """
        out = asdict(self)  # copies the dicts, and each StyleStats becomes one
        styles = list(out.pop("styles"))
        out["size"] = list(self.size)
        if self.process_peak_rss_bytes is None:
            del out["process_peak_rss_bytes"]
        if len(styles) == 1:
            out.update(styles[0])
        else:
            out["styles"] = styles
        return out


@dataclass
class TransferResult:
    """The stylised image and what it cost."""

    image: Image.Image
    stats: TransferStats


@dataclass
class BatchResult:
    """One stylised image per style, in the order given, and what the run cost (per style: ``stats.styles``)."""

    images: list[Image.Image]
    stats: TransferStats


@dataclass
class TransferLatents:
    """The latent-space result of a transfer (before VAE decoding), for tests and analysis."""

    student: torch.Tensor  # z_0^m, float32 [1, C, h, w]
    content_terminal: torch.Tensor  # z_T^c, the inverted content latent
    student_terminal: torch.Tensor  # z_T^m, after SINI
    stats: TransferStats


def memory_stats(device: torch.device) -> dict[str, int | None]:
    """``peak_memory_bytes`` of this transfer (CUDA only) and, on a CPU, the process's lifetime peak RSS."""
    import torch

    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "process_peak_rss_bytes": None}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    rss = int(peak if sys.platform == "darwin" else peak * 1024)
    return {"peak_memory_bytes": None, "process_peak_rss_bytes": rss}


@dataclass
class RunCounters:
    """What a run counts as it goes: UNet calls and rows (per phase), and wall seconds per phase."""

    unet_calls: int = 0
    unet_rows: int = 0
    rows_by_phase: dict[str, int] = field(default_factory=lambda: {"invert": 0, "sample": 0})
    seconds: dict[str, float] = field(default_factory=dict)


def run_stats(
    model: DiffusionModel,
    request: TransferRequest,
    plan: TransferPlan,
    counters: RunCounters,
    teachers: dict[str, str | None],
    recording: TeacherRecording | None,
    record_budget_bytes: int,
) -> TransferStats:
    """A run's :class:`TransferStats`, before decoding (no decode seconds or memory figures yet)."""
    recorded = recording if recording is not None and recording.active else None
    return TransferStats(
        unet_calls=counters.unet_calls,
        unet_rows=counters.unet_rows,
        unet_rows_by_phase=dict(counters.rows_by_phase),
        seconds=dict(counters.seconds),
        content_cache_hit=plan.content_cached is not None,
        content_cache_tier=plan.content_tier,
        styles=tuple(
            StyleStats(
                style_cache_hit=(hit is not None) if key is not None else None,
                style_cache_tier=tier,
                mode=style.mode,
                cfg=style.cfg,
            )
            for style, key, hit, tier in zip(
                request.styles, plan.style_keys, plan.cached, plan.style_tiers, strict=True
            )
        ),
        steps=request.params.steps,
        size=request.size,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        model=model.name,
        family=model.family.name,
        inversion=request.params.inversion,
        teachers=teachers,
        record_bytes=recorded.recorded_bytes if recorded is not None else 0,
        record_budget_bytes=record_budget_bytes,
        record_fallback=recording.fallback if recording is not None else None,
    )
