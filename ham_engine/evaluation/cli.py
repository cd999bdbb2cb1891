"""``ham eval``: run HAM over a content × style benchmark and compute the paper's metrics.

    ham eval --model M --content DIR --style DIR [--pairs all|diagonal] [--out DIR] [--weights DIR]

Writes ``OUT/outputs/*.png`` (reused on a rerun), ``OUT/metrics.json``, ``OUT/table.md``
and ``OUT/contact_sheet.png``. Importing this module does not import torch, so ``ham
--help`` stays light. Exit status: 0 success, 2 bad input, 1 anything else (one line on
stderr; ``HAM_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ham_engine.commands import BadInput, add_param_arguments, run_command, transfer_params

PROG = "ham eval"
DEFAULT_OUT = "ham-eval"


def add_eval_parser(subparsers: Any) -> None:
    """Add the ``eval`` sub-command to an ``argparse`` sub-parsers object."""
    parser = subparsers.add_parser(
        "eval",
        help="reproduce the paper's metrics table on a content x style benchmark",
        description=(
            "Run HAM over every content x style pair (or the diagonal), reuse outputs a previous run made, "
            "then compute ArtFID, FID, LPIPS, LPIPS-gray, CFSD, DINO, CLIP-I, CLIP-T, DC and CC and write "
            "metrics.json, a table beside the paper's and a contact sheet. Metric weights are read from "
            "--weights DIR or the libraries' caches; a missing one is reported as unavailable, one whose "
            "SHA-256 is not the published one is refused (docs/evaluation.md says what goes where)."
        ),
    )
    parser.add_argument("--content", required=True, help="folder of content images")
    parser.add_argument("--style", required=True, help="folder of style images (optional <stem>.txt: style text)")
    parser.add_argument("--pairs", choices=("all", "diagonal"), default="all",
                        help="every content with every style (default), or the i-th with the i-th")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    parser.add_argument("--model", default=os.environ.get("HAM_MODEL") or "tiny",
                        help="'tiny', a diffusers model id or a local folder (default: $HAM_MODEL or tiny)")
    parser.add_argument("--device", default=None, help="torch device (default: $HAM_DEVICE or auto)")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: $HAM_DTYPE or per device)")
    parser.add_argument("--weights", default=None, help="folder holding the metric networks' weights")
    parser.add_argument("--clip-model", default=None,
                        help="CLIP for CLIP-I/CLIP-T: an HF id or folder (default openai/clip-vit-large-patch14)")
    parser.add_argument("--dino-model", default=None,
                        help="DINO ViT for DINO: an HF id or folder (default facebook/dino-vits16)")
    parser.add_argument("--skip-metrics", action="store_true", help="only make the outputs")
    parser.add_argument("--allow-unverified-weights", action="store_true",
                        help="use metric weights whose SHA-256 is not the published one (or not known): the numbers "
                             "are marked unverified and printed without the paper's rows")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # The engine's own parameters, the flags ham transfer and ham submit take.
    add_param_arguments(parser, server_defaults=False)
    parser.set_defaults(handler=run_eval)


def _audit_weights(args: argparse.Namespace, store: Any, clip_model: str, dino_model: str) -> None:
    """Refuse unverified metric weights (``UnverifiedWeights``) unless allowed; warn about them then."""
    from ham_engine.evaluation.weights import UnverifiedWeights

    unverified = [check for check in store.audit(clip_model, dino_model) if not check.verified]
    if unverified and not args.allow_unverified_weights:
        raise UnverifiedWeights(unverified)
    for check in unverified if not args.quiet else ():
        print(f"{PROG}: warning: unverified: {check.problem()}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> None:
    params = transfer_params(args)
    try:
        from ham_engine.engine import HamEngine
        from ham_engine.evaluation import record, report
        from ham_engine.evaluation.pairs import make_pairs
        from ham_engine.evaluation.paper import ablation_row
        from ham_engine.evaluation.runner import run_pairs
        from ham_engine.evaluation.suite import CFSD_SIZE, DEFAULT_CLIP, DEFAULT_DINO, MetricSuite
        from ham_engine.evaluation.weights import UnverifiedWeights, WeightStore
    except ImportError as exc:
        raise RuntimeError(
            f"the engine is not installed ({exc.name}): pip install 'ham-style-transfer[engine]'"
        ) from exc
    out_dir = Path(args.out).expanduser()
    try:
        pairs = make_pairs(args.content, args.style, args.pairs)
        store = WeightStore(args.weights)
        clip_model, dino_model = args.clip_model or DEFAULT_CLIP, args.dino_model or DEFAULT_DINO
        if not args.skip_metrics:  # refuse unverified weights now, not after the transfers
            _audit_weights(args, store, clip_model, dino_model)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"out: {str(out_dir)!r} is a file")
        out_dir.mkdir(parents=True, exist_ok=True)
        engine = HamEngine.load(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, UnverifiedWeights) as exc:
        raise BadInput(str(exc)) from exc

    started = time.perf_counter()
    try:
        results = run_pairs(engine, pairs, params, out_dir, quiet=args.quiet)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    made = sum(not r.reused for r in results)
    if not args.quiet:
        print(f"{len(results)} outputs in {out_dir / 'outputs'} ({made} made, {len(results) - made} reused) "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    report.write_contact_sheet(out_dir, results, args.pairs)
    if args.skip_metrics:
        return

    suite = MetricSuite(store, device=engine.model.device, clip_model=clip_model, dino_model=dino_model,
                        allow_unverified=args.allow_unverified_weights)
    try:
        evaluation = suite.evaluate(results, quiet=args.quiet)
    except UnverifiedWeights as exc:  # a file replaced while the transfers ran
        raise BadInput(str(exc)) from exc
    wall = {r.pair.name: round(r.wall_s, 4) for r in results}
    run_record = record.reproducibility_record(engine, params, args.pairs, wall)
    settings = {"clip_model": clip_model, "dino_model": dino_model, "weights": args.weights, "cfsd_size": CFSD_SIZE,
                "allow_unverified_weights": args.allow_unverified_weights}
    report.write_metrics(out_dir, evaluation, results, run_record, settings)
    label = f"this run ({engine.model.name}, {len(results)} pairs, {params.size} px, {params.steps} steps)"
    table = report.markdown_table(evaluation, label, ablation_row(params.sini, params.gar, params.lat))
    report.write_table(out_dir, table)
    if not args.quiet:
        print(table, end="")
        print(f"wrote {out_dir / report.METRICS_FILE}, {out_dir / report.TABLE_FILE}, "
              f"{out_dir / report.CONTACT_SHEET_FILE}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``ham eval`` for parsed ``args``; return the exit status (0, 1 or 2)."""
    interrupted = "interrupted (finished outputs are kept; rerun to resume)"
    return run_command(PROG, lambda: _evaluate(args), interrupted=interrupted)


def main(argv: list[str] | None = None) -> int:
    """``python -m ham_engine.evaluation.cli eval ...`` (``ham eval`` is the same)."""
    parser = argparse.ArgumentParser(prog="ham", description="HAM evaluation")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
