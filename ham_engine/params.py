"""Transfer parameters: one frozen, validated object, importable without torch.

The HTTP API imports this module to validate requests before they are queued, so it
must never import torch, diffusers or anything heavy.

Defaults are the paper's (docs/method.md): 50 DDIM steps, 512 px, alpha=0.75 (GAR),
beta=0.25 (LAT), gamma=0.5 (SINI), CFG 7.5 for a text-guided style teacher. Choices the
paper leaves open are marked "our reading" and kept as named parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MIN_STEPS = 1
MAX_STEPS = 1000  # a DDIM schedule cannot have more steps than training timesteps
MIN_SIZE = 64
MAX_SIZE = 2048
SIZE_MULTIPLE = 64
MAX_SEED = 2**63 - 1
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 1000
MAX_LAYER_PATTERNS = 64
INVERSIONS = ("target", "source")
TEACHERS = ("auto", "live", "recorded")

# Our reading (docs/method.md §6): every transformer block of the UNet decoder.
DEFAULT_LAYERS: tuple[str, ...] = ("up_blocks.*",)

# The defaults that depend on the model's family (``ModelFamily.name``): a transfer that leaves one
# out gets its model's family's value — the service resolves it once the job's model is known.
# The field defaults of TransferParams are the "sd" ones. SDXL is trained at 1024 px.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {"size": 512},
    "sdxl": {"size": 1024},
    "sd3": {"size": 1024},
    "flux": {"size": 1024},
}


def family_default(family: str, name: str) -> Any:
    """The default of parameter ``name`` for a model of ``family`` (the field default where none is set)."""
    by_family = FAMILY_DEFAULTS.get(family, {})
    if name in by_family:
        return by_family[name]
    return next(f.default for f in fields(TransferParams) if f.name == name)


def family_params(family: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` completed with ``family``'s defaults for what it leaves out (the others stay field defaults)."""
    return {**FAMILY_DEFAULTS.get(family, {}), **given}


class ParamError(ValueError):
    """A parameter is outside its allowed range; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"must be a number in [{low}, {high}], got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ParamError(name, f"must be in [{low}, {high}], got {value!r}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ParamError(name, f"must be an integer in [{low}, {high}], got {value}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ParamError(name, f"must be one of {allowed}, got {str(value)[:40]!r}")


def _check_layers(name: str, patterns: tuple[str, ...]) -> None:
    if not isinstance(patterns, tuple) or not patterns:
        raise ParamError(name, "must be a non-empty list of layer name patterns")
    if len(patterns) > MAX_LAYER_PATTERNS:
        raise ParamError(name, f"at most {MAX_LAYER_PATTERNS} patterns")
    for p in patterns:
        if not isinstance(p, str) or not p.strip() or len(p) > 200:
            raise ParamError(name, f"each pattern must be a non-empty string, got {p!r}")


def _param(
    default: Any,
    help: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    multiple_of: int | None = None,
    choices: tuple[str, ...] | None = None,
    example: Any = None,
    label: str = "",
    explain: str = "",
    group: str = "advanced",
) -> Any:
    """A client-settable field of :class:`TransferParams`: its default and what a client may send.

    The bounds here are the only ones: the API schema, the CLI flags and the docs table show
    them, and ``__post_init__`` enforces them through :meth:`ParamSpec.check`.
    ``label``, ``explain`` and ``group`` are for people (the playground): a name in words, what
    the parameter changes in the picture and which way, and ``"main"`` or ``"advanced"``.
    """
    spec = {"help": help, "minimum": minimum, "maximum": maximum, "multiple_of": multiple_of,
            "choices": choices, "example": example, "label": label, "explain": explain, "group": group}
    return field(default=default, metadata={"client": spec})


@dataclass(frozen=True)
class TransferParams:
    """Everything that shapes one HAM transfer besides the images and the prompt.

    Attributes:
        steps: DDIM steps for inversion and sampling (paper: 50), 1..1000.
        seed: seed for every random draw (text-guided style noise), 0..2**63-1.
        size: length in pixels of the output's longer side, a multiple of 64 in
            64..2048; the shorter side follows the content's aspect ratio.
        alpha: GAR blend, Q̂ = α·Q_student + (1−α)·AdaIN(Q_content, Q_style), in [0, 1].
        beta: LAT query blend, Q̂ = β·Q_student + (1−β)·Q_content, in [0, 1].
        gamma: SINI blend, z_T = γ·z_T^c + (1−γ)·AdaIN(z_T^c, z_T^s), in [0, 1].
        guidance: classifier-free guidance scale used when a style prompt drives a
            text-guided style teacher (no style image), in [1, 30]; ignored otherwise.
        sini, gar, lat: switch each module on or off (the paper's ablation).
        guide_student: under CFG (a text-guided style teacher), guide the student too,
            ε = ε_uncond + g·(ε_cond − ε_uncond), its halves differing through LAT and GAR;
            false: the student follows its cond half alone. Our reading.
        gar_layers: fnmatch patterns over self-attention (``attn1``) module names.
        lat_layers: fnmatch patterns over cross-attention (``attn2``) module names.
        step_start, step_end: GAR/LAT act at step i (0-based, of ``steps``) when
            step_start <= i/steps < step_end; fractions in [0, 1]. Our reading.
        inversion: where a DDIM inversion step evaluates the model: "target", at the
            timestep it moves to (diffusers' ``DDIMInverseScheduler``, the default), or
            "source", at the latent's own timestep, which is exactly each sampling step's
            teacher call, so the teachers can be recorded (docs/method.md).
        teachers: "auto" records the content and image style teachers during a
            "source" inversion when the recording fits the engine's byte budget, else
            runs them live; "live" always runs them in the sampling batch; "recorded" is
            "auto" that refuses the "target" inversion. Same result either way, up to
            float rounding.
    """

    steps: int = _param(
        50, "DDIM steps, inversion and sampling", MIN_STEPS, MAX_STEPS, example=30, group="main", label="Steps",
        explain="How many denoising steps the picture is made in. Fewer steps: faster and rougher; more: finer, "
        "and the run takes longer in proportion.",
    )
    seed: int = _param(
        0, "seed for every random draw", 0, MAX_SEED, label="Seed",
        explain="The same seed and settings give the same picture again; another seed gives a variation "
        "(most visible with a style described in words).",
    )
    size: int = _param(
        512, "the output's longer side in pixels; the shorter follows the content's aspect ratio",
        MIN_SIZE, MAX_SIZE, multiple_of=SIZE_MULTIPLE, example=512, group="main", label="Size (longer side, px)",
        explain="The picture's longer side; the other follows the content photo's shape. Larger pictures take "
        "longer: time grows with the number of pixels (512 px takes about 4 times as long as 256 px).",
    )
    alpha: float = _param(
        0.75, "GAR blend", 0.0, 1.0, example=0.75, group="main", label="α — overall style (GAR)",
        explain="How strongly the style's colours and textures are imposed on the whole picture. Lower α: "
        "stronger, more even style everywhere; higher α: a lighter touch that keeps more of the picture's own look.",
    )
    beta: float = _param(
        0.25, "LAT query blend", 0.0, 1.0, group="main", label="β — content detail (LAT)",
        explain="How closely shapes and local detail follow the content photo. Lower β: the layout and details "
        "of the photo stay put; higher β: the details are redrawn more freely in the style.",
    )
    gamma: float = _param(
        0.5, "SINI blend", 0.0, 1.0, group="main", label="γ — starting colours (SINI)",
        explain="What the picture starts from. Lower γ: from the photo recoloured with the style's palette and "
        "contrast, so those come through more; higher γ: from the content photo as it is, keeping its colours.",
    )
    guidance: float = _param(
        7.5, "CFG scale, used only for a text-only style", MIN_GUIDANCE, MAX_GUIDANCE,
        label="Prompt strength (style in words only)",
        explain="Used only when the style is a prompt without a style image. Higher: follows the words more "
        "literally, with harsher colours; lower: softer and looser.",
    )
    sini: bool = _param(
        True, "style-injected noise initialisation on/off", label="SINI — start from the style's colours",
        explain="Off: the picture starts from the content photo alone, and γ has no effect.",
    )
    gar: bool = _param(
        True, "Global Attention Regulation on/off", label="GAR — overall style",
        explain="Off: the style's overall colours and textures are not imposed (α has no effect); much less "
        "style shows.",
    )
    lat: bool = _param(
        True, "Local Attention Transplantation on/off", label="LAT — keep the content's detail",
        explain="Off: local detail is not steered by the content photo (β has no effect); shapes may drift.",
    )
    guide_student: bool = _param(
        True, "under CFG (text-only style) guide the student too; false: it follows its conditional half (our reading)",
        label="Steer the picture by the prompt too",
        explain="Only for a style in words: on, the picture itself is steered by the prompt as well as by the "
        "style reference; off, only the reference is.",
    )
    gar_layers: tuple[str, ...] = field(default=DEFAULT_LAYERS)
    lat_layers: tuple[str, ...] = field(default=DEFAULT_LAYERS)
    step_start: float = _param(
        0.0, "GAR/LAT act from this fraction of the steps (our reading)", 0.0, 1.0,
        label="Style from (share of the run)",
        explain="When GAR and LAT start, as a share of the steps. Later: the layout forms freely first and the "
        "style reaches only the finishing detail.",
    )
    step_end: float = _param(
        1.0, "GAR/LAT act until this fraction of the steps; step_start < step_end, and the window must hold "
        "at least one step when GAR or LAT is on", 0.0, 1.0, label="Style until (share of the run)",
        explain="When GAR and LAT stop, as a share of the steps; must be after the start. Earlier: the last "
        "steps clean up without them, for a smoother finish.",
    )
    inversion: str = _param(
        "target", "where a DDIM inversion step evaluates the model: at the timestep it moves to, or at the "
        "latent's own (which lets the teachers be recorded; docs/method.md)", choices=INVERSIONS,
        label="How the photos are traced back",
        explain="How the content and style pictures are turned back into noise before the new picture is made. "
        "The default (target) is the usual way; source lets the server reuse that work for speed.",
    )
    teachers: str = _param(
        "auto", "auto: with inversion=source the teachers are recorded during inversion when the recording fits "
        "the worker's HAM_RECORD_BYTES, else run live; live; recorded (needs inversion=source)", choices=TEACHERS,
        label="Reuse the reference passes",
        explain="auto: the server reuses what it traced when that saves time; live: it always recomputes; "
        "recorded: always reuse (needs source above). The picture is the same either way.",
    )

    def __post_init__(self) -> None:
        # Accept lists for the layer patterns (JSON has no tuples).
        for name in ("gar_layers", "lat_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        # NumPy scalars (np.float32(0.5), np.int64(30)) are numbers too: store them as Python
        # ones, so the fields stay JSON-ready and compare equal to what the API decodes.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and isinstance(value, numbers.Integral) and type(value) not in (int, bool):
                object.__setattr__(self, f.name, int(value))
            elif f.type == "float" and isinstance(value, numbers.Real) and type(value) not in (int, float, bool):
                object.__setattr__(self, f.name, float(value))
        # Each client parameter against its own spec: the bounds and choices are declared once, in _param.
        for spec in PARAM_SPECS:
            spec.check(getattr(self, spec.name))
        _check_layers("gar_layers", self.gar_layers)
        _check_layers("lat_layers", self.lat_layers)
        self._check_relations()

    def _check_relations(self) -> None:
        """The rules that tie parameters together (each parameter alone is within its spec)."""
        if self.step_start >= self.step_end:
            raise ParamError(
                "step_start",
                f"must be smaller than step_end ({self.step_end}), got {self.step_start}",
            )
        if self.teachers == "recorded" and self.inversion != "source":
            raise ParamError(
                "teachers",
                f"'recorded' needs inversion='source' (only its inversion calls are the teachers' calls), "
                f"got inversion={self.inversion!r}",
            )
        # Like a layer pattern that matches nothing, a window between two steps would turn
        # GAR and LAT into a silent no-op (docs/method.md §6): refuse it.
        if (self.gar or self.lat) and not any(self.modulates_step(k) for k in range(self.steps)):
            raise ParamError(
                "step_start",
                f"the window [{self.step_start}, {self.step_end}) holds none of the {self.steps} steps "
                f"(step k acts when step_start <= k/{self.steps} < step_end); widen it or turn gar and lat off",
            )

    def modulates_step(self, step: int) -> bool:
        """Whether GAR/LAT act at 0-based sampling step ``step`` (the step window)."""
        return self.step_start <= step / self.steps < self.step_end

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); inverse of :meth:`from_dict`."""
        d = asdict(self)
        d["gar_layers"] = list(self.gar_layers)
        d["lat_layers"] = list(self.lat_layers)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransferParams:
        """Build from a mapping, refusing unknown keys with a :class:`ParamError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamError(unknown[0], f"unknown parameter; known: {', '.join(sorted(known))}")
        return cls(**dict(data))


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a client may set per request: the single source of the API's form fields and
    JSON properties, their OpenAPI schema, the ``ham transfer``/``ham submit`` flags and the docs table."""

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    example: Any = None
    # For people (the playground, the method page): a name in words, what it changes in the
    # picture and which way, and where it sits ("main" or "advanced").
    label: str = ""
    explain: str = ""
    group: str = "advanced"

    def json_schema(self) -> dict[str, Any]:
        """This parameter as a JSON Schema (an OpenAPI 3.1 property)."""
        types = {bool: "boolean", int: "integer", float: "number", str: "string"}
        schema: dict[str, Any] = {"type": types[self.kind], "default": self.default, "description": self.help}
        if self.minimum is not None:
            schema["minimum"] = self.kind(self.minimum) if self.kind is not bool else self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.kind(self.maximum) if self.kind is not bool else self.maximum
        if self.multiple_of is not None:
            schema["multipleOf"] = self.multiple_of
        if self.choices is not None:
            schema["enum"] = list(self.choices)
        if self.example is not None:
            schema["examples"] = [self.example]
        by_family = self.family_defaults()
        if by_family:
            # `default` is the SD value; which default applies to which family is spelled out.
            schema["x-family-defaults"] = by_family
            schema["description"] += "; default by the model's family: " + ", ".join(
                f"{family} {value}" for family, value in by_family.items()
            )
        return schema

    def family_defaults(self) -> dict[str, Any]:
        """Family → this parameter's default there, for a parameter whose default depends on the family."""
        return {family: d[self.name] for family, d in FAMILY_DEFAULTS.items() if self.name in d}
    def check(self, value: Any) -> None:
        """Raise a :class:`ParamError` naming this parameter unless ``value`` is one it allows."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ParamError(self.name, f"must be true or false, got {value!r}")
        elif self.choices is not None:
            _check_choice(self.name, value, self.choices)
        elif self.kind is int:
            _check_int(self.name, value, self.minimum, self.maximum)
            if self.multiple_of and value % self.multiple_of:
                raise ParamError(self.name, f"must be a multiple of {self.multiple_of}, got {value}")
        else:
            _check_range(self.name, value, self.minimum, self.maximum)

    def allowed(self) -> str:
        """The allowed values in words, for help texts and the docs table."""
        if self.kind is bool:
            return "true or false"
        if self.choices is not None:
            return ", ".join(self.choices)
        text = f"{_number(self.minimum)}..{_number(self.maximum)}"
        return f"{text}, a multiple of {self.multiple_of}" if self.multiple_of else text


def _number(value: float | None) -> str:
    if value == MAX_SEED:
        return "2**63-1"
    return "" if value is None else repr(value)


# Parameters a client may set per request; the layer patterns stay server-side because they
# name modules of one particular UNet.
PARAM_SPECS: tuple[ParamSpec, ...] = tuple(
    ParamSpec(name=f.name, kind=type(f.default), default=f.default, **f.metadata["client"])
    for f in fields(TransferParams)
    if "client" in f.metadata
)
CLIENT_PARAMS: dict[str, type] = {spec.name: spec.kind for spec in PARAM_SPECS}


def params_table(specs: tuple[ParamSpec, ...] = PARAM_SPECS) -> str:
    """The Markdown table of ``specs`` that docs/api.md carries (a test keeps them equal)."""
    rows = ["| Parameter | Type | Default | Allowed | What |", "|---|---|---|---|---|"]
    for spec in specs:
        default = str(spec.default).lower() if spec.kind is bool else f"`{spec.default}`"
        if spec.family_defaults():
            default = ", ".join(f"{family}: `{value}`" for family, value in spec.family_defaults().items())
        rows.append(f"| `{spec.name}` | {spec.kind.__name__} | {default} | {spec.allowed()} | {spec.help} |")
    return "\n".join(rows) + "\n"


def check_style_reference(has_style_image: bool, style_prompt: str | None) -> str | None:
    """Validate the style reference of a request; return the normalised prompt.

    A transfer needs a style image, a style prompt, or both. A prompt is stripped;
    an empty prompt counts as none.
    """
    prompt = style_prompt.strip() if isinstance(style_prompt, str) else style_prompt
    if prompt is not None and not isinstance(prompt, str):
        raise ParamError("style_prompt", "must be text")
    if prompt == "":
        prompt = None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise ParamError("style_prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    if not has_style_image and prompt is None:
        raise ParamError("style", "give a style image, a style_prompt, or both")
    return prompt
