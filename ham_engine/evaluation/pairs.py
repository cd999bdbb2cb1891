"""The benchmark's (content, style) pairs, from two folders of images.

``all`` pairs every content with every style (the StyleID protocol: 20 COCO contents ×
40 WikiArt styles = 800 outputs); ``diagonal`` pairs the i-th content with the i-th
style (sorted by name), for a quick look or a one-to-one benchmark. An output is named
``<content stem>__<style stem>.png`` so a rerun finds it again.

A style's describing text for CLIP-T (e.g. "an ink engraving") is a ``<style stem>.txt``
file beside the style image; a style without one has no CLIP-T.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PAIRINGS = ("all", "diagonal")


@dataclass(frozen=True)
class Pair:
    """One content image, one style image, and the name of their output."""

    content: Path
    style: Path

    @property
    def name(self) -> str:
        """``<content stem>__<style stem>``: the output's file stem."""
        return f"{self.content.stem}__{self.style.stem}"

    @property
    def style_text(self) -> str | None:
        """The style's describing text from ``<style stem>.txt`` beside it, or None."""
        sidecar = self.style.with_suffix(".txt")
        if not sidecar.is_file():
            return None
        text = " ".join(sidecar.read_text(encoding="utf-8").split())
        return text or None


def list_images(folder: str | Path, field: str) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; ``ValueError`` naming ``field`` if none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"{field}: folder {str(path)!r} does not exist")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"{field}: no images ({', '.join(IMAGE_SUFFIXES)}) in {str(path)!r}")
    stems = [p.stem for p in found]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"{field}: two images share the name {duplicates[0]!r} (outputs are named by stem)")
    return found


def make_pairs(content_dir: str | Path, style_dir: str | Path, pairing: str = "all") -> list[Pair]:
    """The pairs of ``pairing`` ("all" or "diagonal") over the images of two folders, in a stable order."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairs: must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    contents = list_images(content_dir, "content")
    styles = list_images(style_dir, "style")
    if pairing == "diagonal":
        if len(contents) != len(styles):
            raise ValueError(
                f"pairs: diagonal needs as many contents as styles, got {len(contents)} and {len(styles)}"
            )
        return [Pair(c, s) for c, s in zip(contents, styles, strict=True)]
    return [Pair(c, s) for c in contents for s in styles]
