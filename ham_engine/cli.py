"""``ham transfer``: one HAM style transfer from the shell, with a progress bar.

    ham transfer CONTENT.png --style STYLE.png -o OUT.png [--model tiny] [--steps 50] ...

The top-level ``ham`` command (``ham_cli/main.py``) mounts this with
:func:`add_transfer_parser` and calls :func:`run_transfer`; ``python -m ham_engine.cli
transfer ...`` works on its own. Importing this module does not import torch, so ``ham``
still starts (and shows help) on an API-only install without the engine extras.

Exit status: 0 on success, 2 for bad input (a missing file, a parameter out of range, no
style), 1 for anything else; errors are one line on stderr (set ``HAM_DEBUG=1`` for the
traceback of an unexpected one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ham_engine.commands import BadInput, add_param_arguments, params_from_args, run_command, transfer_params
from ham_engine.params import ParamError, check_style_reference

# add_param_arguments and params_from_args live in ham_engine.commands; `ham submit` imports them from here too.
__all__ = ["PROG", "add_param_arguments", "add_transfer_parser", "main", "params_from_args", "run_transfer"]

PROG = "ham transfer"


def add_transfer_parser(subparsers: Any) -> None:
    """Add the ``transfer`` sub-command to an ``argparse`` sub-parsers object."""
    parser = subparsers.add_parser(
        "transfer",
        help="restyle one image with HAM",
        description=(
            "Restyle CONTENT with a style image and/or a style prompt (HAM, training-free). "
            "The default model 'tiny' is random and makes noise-like pictures; use a Stable Diffusion "
            "1.x/2.x or SDXL id or folder for real ones (SDXL: --size 1024)."
        ),
    )
    parser.add_argument("content", help="the content image (PNG, JPEG, WebP, ...)")
    parser.add_argument("--style", help="the style image")
    parser.add_argument("--style-prompt", help="a text describing the style (with or without --style)")
    parser.add_argument("-o", "--output", required=True, help="where to write the result (PNG, JPEG or WebP)")
    parser.add_argument(
        "--model",
        default=os.environ.get("HAM_MODEL") or "tiny",
        help="'tiny', 'tiny-xl', 'tiny-sd3', 'tiny-flux', or an SD 1.x/2.x, SDXL, SD3 or FLUX model id or local "
        "folder (default: $HAM_MODEL or tiny)",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: $HAM_DEVICE or auto)")
    add_param_arguments(parser, server_defaults=False)
    parser.add_argument("--record-bytes", type=int, default=os.environ.get("HAM_RECORD_BYTES") or None,
                        help="bytes the teachers' recording may take (default: $HAM_RECORD_BYTES, else a share "
                        "of the device's memory)")
    parser.add_argument(
        "--feature-store",
        metavar="DIR",
        help="keep style features and content inversions in DIR: a later run with the same style or content "
        "skips that work",
    )
    parser.add_argument("--stats", action="store_true", help="print the transfer's stats as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_transfer)


def _check_output(path: Path) -> None:
    from PIL import Image

    extensions = Image.registered_extensions()
    if path.suffix.lower() not in extensions:
        raise BadInput(f"output: {str(path)!r} needs an image extension such as .png")
    if not path.parent.is_dir():
        raise BadInput(f"output: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise BadInput(f"output: {str(path)!r} is a folder")


def _transfer(args: argparse.Namespace) -> None:
    params = transfer_params(args)
    try:
        style_prompt = check_style_reference(args.style is not None, args.style_prompt)
    except ParamError as exc:
        raise BadInput(str(exc)) from exc
    output = Path(args.output).expanduser()
    _check_output(output)
    try:
        from tqdm import tqdm

        from ham_engine.engine import HamEngine
        from ham_engine.images import open_image
    except ImportError as exc:
        raise RuntimeError(
            f"the engine is not installed ({exc.name}): pip install 'ham-style-transfer[engine]'"
        ) from exc
    try:
        content = open_image(args.content, field="content")
        style = open_image(args.style, field="style") if args.style is not None else None
        engine = HamEngine.load(
            args.model, device=args.device, record_bytes=args.record_bytes, feature_store=args.feature_store
        )
    except (ValueError, OSError) as exc:
        raise BadInput(str(exc)) from exc

    started = time.perf_counter()
    # The engine reports inversion and sampling steps together: 2 * steps in all.
    with tqdm(total=2 * params.steps, desc="transfer", unit="step", disable=args.quiet, file=sys.stderr) as bar:

        def progress(step: int, total: int) -> None:
            # Follow the total the engine reports, should it ever count differently.
            bar.total = total
            bar.n = step
            bar.refresh()

        try:
            result = engine.transfer(content, style=style, style_prompt=style_prompt, params=params, progress=progress)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
    result.image.save(output)
    seconds = time.perf_counter() - started
    if args.stats:
        print(json.dumps(result.stats.to_dict(), default=str, sort_keys=True))
    elif not args.quiet:
        width, height = result.image.size
        print(f"wrote {output} ({width}x{height}) in {seconds:.1f} s", file=sys.stderr)


def run_transfer(args: argparse.Namespace) -> int:
    """Run ``ham transfer`` for parsed ``args``; return the exit status (0, 1 or 2)."""
    return run_command(PROG, lambda: _transfer(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m ham_engine.cli transfer ...`` (the ``ham`` command offers the same sub-command)."""
    parser = argparse.ArgumentParser(prog="ham", description="HAM style transfer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_transfer_parser(subparsers)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
