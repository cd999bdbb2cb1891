"""The paper's reported numbers (PAPER.md §6, the StyleID benchmark protocol), to print beside ours.

Copied here so the repository does not depend on the paper's text. The paper gives no
FID, LPIPS-gray or CFSD column; :func:`implied_fid` recovers the FID its ArtFID and LPIPS
imply, which the table marks as derived.
"""

from __future__ import annotations

from types import MappingProxyType

# method -> metric -> value; metric keys are those of metrics.json.
PAPER_ROWS = MappingProxyType({
    "StyleID (CVPR'24)": MappingProxyType(
        {"art_fid": 15.161, "lpips": 0.635, "dino": 0.544, "clip_i": 0.619, "clip_t": 0.213, "dc": 1.873, "cc": 1.964}
    ),
    "DiffArtist (MM'25)": MappingProxyType(
        {"art_fid": 16.174, "lpips": 0.520, "dino": 0.629, "clip_i": 0.626, "clip_t": 0.220, "dc": 1.987, "cc": 1.984}
    ),
    "AttDistillation (CVPR'25)": MappingProxyType(
        {"art_fid": 16.170, "lpips": 0.629, "dino": 0.541, "clip_i": 0.615, "clip_t": 0.219, "dc": 1.878, "cc": 1.969}
    ),
    "HAM (paper)": MappingProxyType(
        {"art_fid": 15.151, "lpips": 0.479, "dino": 0.728, "clip_i": 0.682, "clip_t": 0.223, "dc": 2.113, "cc": 2.057}
    ),
})

# The rows the report prints beside a run.
COMPARED = ("HAM (paper)", "StyleID (CVPR'24)")

PROTOCOL = "content: MS-COCO, style: WikiArt (StyleID's benchmark: 20 contents x 40 styles), SD 2.1 base, 50 DDIM steps"


def implied_fid(art_fid: float, lpips: float) -> float:
    """The FID that ArtFID = (1 + LPIPS)·(1 + FID) implies: ArtFID / (1 + LPIPS) − 1."""
    return art_fid / (1.0 + lpips) - 1.0
