"""Compute the paper's metrics over a run's outputs, each from its own published network.

:class:`MetricSuite` loads each network from the :class:`~.weights.WeightStore` when it
is first needed; a metric whose weights are missing becomes
``"unavailable: <what to put where>"`` and the others are still computed. Composite
scores (ArtFID, DC, CC) are unavailable when a part is, and say which.

Image preparation, per metric (docs/evaluation.md):

- FID: the outputs against the pairs' style images (one per pair, as art-fid compares
  its copies), each at its own size, resized to 299² inside the network.
- LPIPS / LPIPS-gray: content resized to the output's size, both in [−1, 1]; gray is
  the Rec. 601 luma replicated to three channels.
- CFSD: content and output at the output's aspect, longer side ``CFSD_SIZE``.
- CLIP: shorter side to the model's input size (bicubic), centre crop, CLIP's
  normalisation. DINO: shorter side to 256/224 of the input size, centre crop,
  ImageNet normalisation (DreamBooth's DINO score).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ham_engine.evaluation import metrics
from ham_engine.evaluation.inception import FidInceptionV3
from ham_engine.evaluation.networks import IMAGENET_MEAN, IMAGENET_STD, LpipsAlex, Vgg16Trunk, load_weights, resize
from ham_engine.evaluation.runner import PairResult
from ham_engine.evaluation.weights import (
    ALEXNET,
    LPIPS_HEADS,
    VGG16,
    Checkpoint,
    UnverifiedWeights,
    WeightCheck,
    WeightStore,
    WeightsUnavailable,
    verify_checkpoint,
    verify_folder,
)
from ham_engine.images import open_image, to_rgb

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
CFSD_SIZE = 256
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
UNAVAILABLE = "unavailable: "

# The per-pair metrics, in the order the table shows them.
PER_PAIR = ("lpips", "lpips_gray", "cfsd", "dino", "clip_i", "clip_t")


def is_available(value: Any) -> bool:
    """True for a computed number, False for an ``"unavailable: ..."`` string."""
    return not (isinstance(value, str) and value.startswith(UNAVAILABLE))


@dataclass
class Evaluation:
    """The metrics of one run: set-level values, per-pair values, and what was loaded."""

    metrics: dict[str, float | str]
    per_pair: list[dict[str, float | str]]
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {file, sha256, verified, ...}
    # Why weights that were used are not the published ones (empty: every loaded file verified).
    unverified: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """True when every metric network that produced a number was verified by its published SHA-256."""
        return not self.unverified


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image → [1, 3, H, W] float32 in [0, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _load_image(path: Path, field_name: str) -> torch.Tensor:
    return to_tensor(open_image(path, field=field_name))


def _gray(images: torch.Tensor) -> torch.Tensor:
    luma = 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]
    return luma.expand(-1, 3, -1, -1)


def _center_crop_resized(images: torch.Tensor, short_side: int, crop: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    scale = short_side / min(height, width)
    size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
    resized = torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return resized[..., top : top + crop, left : left + crop].clamp(0.0, 1.0)


def _normalized(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (images - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)


def _preprocessor_stats(folder: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple, tuple]:
    config = folder / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
    return mean, std


def _available_values(
    computations: dict[str, Callable[[], float]], unavailable: dict[str, str]
) -> dict[str, float | str]:
    """Each metric's value, or why it is unavailable; a metric whose network is missing is not retried."""
    values: dict[str, float | str] = {}
    for name, compute in computations.items():
        known = unavailable.get("clip_i" if name == "clip_t" else name)
        if known is not None:  # its network is missing: say so once per pair, without retrying
            values[name] = known
            continue
        try:
            values[name] = compute()
        except WeightsUnavailable as exc:
            values[name] = f"{UNAVAILABLE}{exc}"
            if name != "clip_t":  # a missing network stays missing; a missing text is per style
                unavailable[name] = values[name]
    return values


class MetricSuite:
    """The paper's metrics; networks load lazily from ``store`` and are kept for the suite's life.

    A checkpoint that is missing, or present but not the network it is named after, makes
    its metric unavailable (with the reason); the other metrics are still computed. A
    checkpoint whose SHA-256 is not the published one raises :class:`UnverifiedWeights`
    unless ``allow_unverified``; then it is used and :attr:`Evaluation.unverified` says so.
    """

    def __init__(
        self,
        store: WeightStore,
        device: str | torch.device = "cpu",
        clip_model: str = DEFAULT_CLIP,
        dino_model: str = DEFAULT_DINO,
        allow_unverified: bool = False,
    ) -> None:
        self.store = store
        self.allow_unverified = allow_unverified
        self.device = torch.device(device)
        self.clip_model = clip_model
        self.dino_model = dino_model
        self.loaded: dict[str, dict[str, Any]] = {}
        self._networks: dict[str, Any] = {}
        # A content is in every style's pair (and a style text in every content's): embed each once.
        self._embeddings: dict[tuple[str, object], torch.Tensor] = {}

    def _embedding(self, kind: str, key: object, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if (kind, key) not in self._embeddings:
            self._embeddings[(kind, key)] = compute()
        return self._embeddings[(kind, key)]

    # -- loading ------------------------------------------------------------------------

    def _verified(self, checks: list[WeightCheck]) -> list[WeightCheck]:
        unverified = [check for check in checks if not check.verified]
        if unverified and not self.allow_unverified:
            raise UnverifiedWeights(unverified)
        return checks

    def _state(self, role: str, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        path = self.store.checkpoint(checkpoint)
        (check,) = self._verified([verify_checkpoint(role, path, checkpoint)])
        self.loaded[role] = check.as_record()
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state

    def _network(self, role: str, build: Callable[[], Any]) -> Any:
        if role not in self._networks:
            from transformers.utils import logging as hf_logging

            # transformers' per-load progress bars would break into the eval's own output.
            was_enabled = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            recorded = set(self.loaded)
            try:
                self._networks[role] = build()
            except (ValueError, WeightsUnavailable) as exc:
                for key in set(self.loaded) - recorded:  # list only what was really loaded
                    del self.loaded[key]
                if isinstance(exc, WeightsUnavailable):
                    raise
                # A file under the right name that is not that network.
                raise WeightsUnavailable(f"{exc}; replace it with the published file") from exc
            finally:
                if was_enabled:
                    hf_logging.enable_progress_bar()
        return self._networks[role]

    def _inception(self) -> FidInceptionV3:
        def build() -> FidInceptionV3:
            # art-fid's Inception when it is given (the ArtFID variant), else pytorch-fid's.
            checkpoint = self.store.fid_checkpoint()
            network = FidInceptionV3()
            state = self._state("fid", checkpoint)
            load_weights(network, state, ignore=("fc.", "AuxLogits."), what=checkpoint.filename)
            return network.eval().to(self.device)

        return self._network("fid", build)

    def _lpips(self) -> LpipsAlex:
        def build() -> LpipsAlex:
            network = LpipsAlex()
            state = self._state("lpips_trunk", ALEXNET)
            load_weights(network.trunk, state, ignore=("classifier.",), what=ALEXNET.filename)
            network.load_heads(self._state("lpips_heads", LPIPS_HEADS))
            return network.eval().to(self.device)

        return self._network("lpips", build)

    def _vgg(self) -> Vgg16Trunk:
        def build() -> Vgg16Trunk:
            network = Vgg16Trunk()
            beyond = ("classifier.", *(f"features.{i}." for i in range(len(network.features), 31)))
            load_weights(network, self._state("cfsd", VGG16), ignore=beyond, what=VGG16.filename)
            return network.eval().to(self.device)

        return self._network("cfsd", build)

    def _clip(self) -> tuple[Any, Any, Path]:
        def build() -> tuple[Any, Any, Path]:
            from transformers import CLIPModel, CLIPTokenizer

            folder = self.store.pretrained_folder(self.clip_model, "CLIP-I / CLIP-T")
            checks = self._verified(verify_folder("clip", folder))
            model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(self.device)
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.loaded["clip"] = _folder_record(self.clip_model, folder, checks)
            return model, tokenizer, folder

        return self._network("clip", build)

    def _dino(self) -> tuple[Any, Path]:
        def build() -> tuple[Any, Path]:
            from transformers import ViTModel

            folder = self.store.pretrained_folder(self.dino_model, "DINO")
            checks = self._verified(verify_folder("dino", folder))
            model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True)
            self.loaded["dino"] = _folder_record(self.dino_model, folder, checks)
            return model.eval().to(self.device), folder

        return self._network("dino", build)

    # -- features -----------------------------------------------------------------------

    def inception_features(self, image: torch.Tensor) -> np.ndarray:
        """pool3 features [1, 2048] of an image [1, 3, H, W] in [0, 1] (float64)."""
        return self._inception()(image.to(self.device)).double().cpu().numpy()

    def clip_image_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        model, _, folder = self._clip()
        size = model.config.vision_config.image_size
        mean, std = _preprocessor_stats(folder, CLIP_MEAN, CLIP_STD)
        pixels = _normalized(_center_crop_resized(image, size, size), mean, std).to(self.device)
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        return model.visual_projection(pooled)

    def clip_text_embeddings(self, text: str) -> torch.Tensor:
        model, tokenizer, _ = self._clip()
        tokens = tokenizer([text], padding="max_length", truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        output = model.text_model(input_ids=tokens.input_ids.to(self.device),
                                  attention_mask=tokens.attention_mask.to(self.device))
        return model.text_projection(output.pooler_output)

    def dino_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        model, folder = self._dino()
        size = model.config.image_size
        mean, std = _preprocessor_stats(folder, IMAGENET_MEAN, IMAGENET_STD)
        pixels = _normalized(_center_crop_resized(image, round(size * 256 / 224), size), mean, std).to(self.device)
        return model(pixel_values=pixels).last_hidden_state[:, 0]

    # -- the metrics ----------------------------------------------------------------------

    def _pair_metrics(self, result: PairResult, content: torch.Tensor, output: torch.Tensor,
                      unavailable: dict[str, str]) -> dict[str, float | str]:
        """One pair's per-pair metrics; the first failure of a metric's loading is kept in ``unavailable``."""
        content_at_output = resize(content, tuple(output.shape[-2:]))
        height, width = output.shape[-2:]
        scale = CFSD_SIZE / max(height, width)
        cfsd_size = (max(8, round(height * scale)), max(8, round(width * scale)))
        style_text = result.pair.style_text

        def lpips_value(gray: bool) -> float:
            network = self._lpips()
            a, b = (_gray(content_at_output), _gray(output)) if gray else (content_at_output, output)
            fa, fb = network.features(2 * a.to(self.device) - 1), network.features(2 * b.to(self.device) - 1)
            return float(metrics.lpips_distance(fa, fb, list(network.heads))[0])

        def cfsd_value() -> float:
            network = self._vgg()
            fc = network(resize(content, cfsd_size).to(self.device))
            fo = network(resize(output, cfsd_size).to(self.device))
            return float(metrics.cfsd(fc, fo)[0])

        def clip_t_value() -> float:
            if style_text is None:
                raise WeightsUnavailable(
                    f"no style text: put {result.pair.style.stem}.txt (e.g. 'an ink engraving') beside "
                    f"{result.pair.style.name}"
                )
            text = self._embedding("clip_text", style_text, lambda: self.clip_text_embeddings(style_text))
            return float(metrics.cosine(output_clip(), text)[0])

        source = result.pair.content

        def content_dino() -> torch.Tensor:
            return self._embedding("dino", source, lambda: self.dino_embeddings(content))

        def content_clip() -> torch.Tensor:
            return self._embedding("clip_image", source, lambda: self.clip_image_embeddings(content))

        def output_clip() -> torch.Tensor:  # CLIP-I and CLIP-T both read it
            return self._embedding("clip_image", result.output, lambda: self.clip_image_embeddings(output))

        computations: dict[str, Callable[[], float]] = {
            "lpips": lambda: lpips_value(gray=False),
            "lpips_gray": lambda: lpips_value(gray=True),
            "cfsd": cfsd_value,
            "dino": lambda: float(metrics.cosine(content_dino(), self.dino_embeddings(output))[0]),
            "clip_i": lambda: float(metrics.cosine(content_clip(), output_clip())[0]),
            "clip_t": clip_t_value,
        }
        return _available_values(computations, unavailable)

    @torch.inference_mode()
    def evaluate(self, results: list[PairResult], quiet: bool = True) -> Evaluation:
        """All metrics over ``results`` (the runner's outputs, in pair order); a progress bar unless ``quiet``."""
        from tqdm import tqdm

        self._embeddings.clear()  # files may have changed since a previous evaluate()
        unavailable: dict[str, str] = {}
        per_pair: list[dict[str, float | str]] = []
        # Only pool3 features are kept (2048 floats an image, each style once), not the images.
        output_features: list[np.ndarray] = []
        style_features: dict[Path, np.ndarray] = {}
        for result in tqdm(results, desc="metrics", unit="pair", disable=quiet, file=sys.stderr):
            content = _load_image(result.pair.content, "content")
            output = _load_image(result.output, "output")
            per_pair.append(self._pair_metrics(result, content, output, unavailable))
            if "fid" in unavailable:
                continue
            try:
                output_features.append(self.inception_features(output))
                if result.pair.style not in style_features:
                    style_features[result.pair.style] = self.inception_features(_load_image(result.pair.style, "style"))
            except WeightsUnavailable as exc:
                unavailable["fid"] = f"{UNAVAILABLE}{exc}"

        styles = [style_features[r.pair.style] for r in results] if "fid" not in unavailable else []
        summary: dict[str, float | str] = {"fid": self._fid(output_features, styles, unavailable.get("fid"))}
        for name in PER_PAIR:
            summary[name] = _mean(name, [row[name] for row in per_pair])
        summary["art_fid"] = _compose(metrics.art_fid, summary, "fid", "lpips")
        summary["dc"] = _compose(metrics.dino_clip_score, summary, "dino", "clip_t")
        summary["cc"] = _compose(metrics.clip_clip_score, summary, "clip_i", "clip_t")
        unverified = [problem for record in self.loaded.values() for problem in record["problems"]]
        return Evaluation(metrics=summary, per_pair=per_pair, weights=dict(self.loaded), unverified=unverified)

    @staticmethod
    def _fid(outputs: list[np.ndarray], styles: list[np.ndarray], missing: str | None) -> float | str:
        """FID of the outputs against the pairs' styles (a style counts once per pair, as art-fid's copies do)."""
        if missing is not None:
            return missing
        if len(outputs) < 2:
            return f"{UNAVAILABLE}FID needs at least 2 pairs (a covariance of one sample is undefined)"
        return metrics.fid(np.concatenate(outputs), np.concatenate(styles))


def _mean(name: str, values: list[float | str]) -> float | str:
    numbers = [v for v in values if is_available(v)]
    if len(numbers) < len(values):
        missing = next(v for v in values if not is_available(v))
        if not numbers:
            return missing
        reason = missing.removeprefix(UNAVAILABLE)
        return f"{UNAVAILABLE}{len(values) - len(numbers)} of {len(values)} pairs lack {name}: {reason}"
    return float(np.mean(numbers))


def _compose(formula: Callable[[float, float], float], summary: dict, first: str, second: str) -> float | str:
    a, b = summary[first], summary[second]
    if is_available(a) and is_available(b):
        return formula(a, b)
    missing = [name for name, value in ((first, a), (second, b)) if not is_available(value)]
    return f"{UNAVAILABLE}needs {' and '.join(missing)}, {'which are' if len(missing) > 1 else 'which is'} unavailable"


def _folder_record(model: str, folder: Path, checks: list[WeightCheck]) -> dict[str, Any]:
    return {"model": model, "folder": str(folder), "files": [check.as_record() for check in checks],
            "verified": all(check.verified for check in checks),
            "problems": [check.problem() for check in checks if not check.verified]}
