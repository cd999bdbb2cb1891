"""The paper's reported numbers (its comparison table and ablation, on StyleID's benchmark), to print beside ours.

Copied here so the repository does not depend on the paper's text; docs/evaluation.md
("The paper's numbers") holds the same table with its provenance, and a test keeps the two equal. The paper gives no
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

# The ablation (DINO / CLIP-I / CLIP-T), keyed by which modules are on: (sini, gar, lat).
ABLATION = MappingProxyType({
    (False, False, False): ("HAM ablation: none", MappingProxyType({"dino": 0.609, "clip_i": 0.626, "clip_t": 0.220})),
    (False, True, False): ("HAM ablation: +GAR", MappingProxyType({"dino": 0.618, "clip_i": 0.626, "clip_t": 0.231})),
    (False, False, True): ("HAM ablation: +LAT", MappingProxyType({"dino": 0.712, "clip_i": 0.696, "clip_t": 0.193})),
    (False, True, True): (
        "HAM ablation: +GAR+LAT", MappingProxyType({"dino": 0.746, "clip_i": 0.696, "clip_t": 0.202})
    ),
})


def ablation_row(sini: bool, gar: bool, lat: bool) -> tuple[str, MappingProxyType] | None:
    """The paper's ablation row for a run with these modules on (None for the full method or an unreported mix)."""
    return ABLATION.get((sini, gar, lat))

# Where the rows come from, as the table's footnote says it.
PAPER_SOURCE = ("HAM (He et al., CVPR 2026 Findings, arXiv 2603.24043), its comparison table and ablation; "
                "see docs/evaluation.md, \"The paper's numbers\"")

PROTOCOL = "content: MS-COCO, style: WikiArt (StyleID's benchmark: 20 contents x 40 styles), SD 2.1 base, 50 DDIM steps"


def implied_fid(art_fid: float, lpips: float) -> float:
    """The FID that ArtFID = (1 + LPIPS)·(1 + FID) implies: ArtFID / (1 + LPIPS) − 1."""
    return art_fid / (1.0 + lpips) - 1.0
