"""``ham styles ...``: the style library from the command line (``create``, ``list``, ``get``, ``delete``).

Each sub-command prints what the API answered as JSON on stdout (one style per line for ``list``),
so its output can be piped (``ham styles create s.png --name house | jq -r .id``). Exit status: 0
success, 1 when the API refused or could not be reached (its message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ham_client.client import Client
from ham_client.errors import HamError

DEFAULT_API = "http://127.0.0.1:8000"


def add_styles_parser(subparsers: Any, prog: str = "ham") -> None:
    """Add ``styles`` (with its sub-commands) to an argparse ``subparsers``."""
    styles = subparsers.add_parser("styles", help="manage your style library on a running API",
                                   description="Create, list, read and delete the styles of your library.")
    actions = styles.add_subparsers(dest="styles_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="store a style (an image, a prompt, or both); prints it as JSON")
    create.add_argument("image", nargs="?", help="the style image (PNG, JPEG or WebP)")
    create.add_argument("--style-prompt", help="a text describing the style")
    create.add_argument("--name", help="your label for it")
    create.add_argument("--warm", action="store_true", help="queue a job that computes its features now")
    create.add_argument("--size", type=int, help="the warm job's size (with --warm)")
    create.add_argument("--steps", type=int, help="the warm job's steps (with --warm)")
    listing = actions.add_parser("list", help="your styles, newest first, one JSON object per line")
    listing.add_argument("--limit", type=int, default=20, help="page size (1..100, default 20)")
    listing.add_argument("--cursor", help="next_cursor of the previous page")
    for name, text in (("get", "print one style as JSON"), ("delete", "delete a style")):
        action = actions.add_parser(name, help=text)
        action.add_argument("style_id", help="the style's id")
    for action in actions.choices.values():
        action.add_argument("--api", default=os.environ.get("HAM_API_URL", DEFAULT_API),
                            help=f"API base URL (default: $HAM_API_URL or {DEFAULT_API})")
        action.add_argument("--key", default=os.environ.get("HAM_API_KEY"), help="API key (default: $HAM_API_KEY)")
    styles.set_defaults(handler=lambda args: run_styles(args, prog))


def run_styles(args: argparse.Namespace, prog: str = "ham") -> int:
    """Run one ``styles`` action; the exit status."""
    try:
        with Client(args.api, api_key=args.key) as client:
            if args.styles_command == "create":
                image = Path(args.image).expanduser().read_bytes() if args.image else None
                style = client.create_style(image, args.style_prompt, name=args.name, warm=args.warm,
                                            size=args.size, steps=args.steps)
                print(style.model_dump_json())
            elif args.styles_command == "list":
                for style in client.list_styles(args.limit, args.cursor).items:
                    print(style.model_dump_json())
            elif args.styles_command == "get":
                print(client.get_style(args.style_id).model_dump_json())
            else:
                client.delete_style(args.style_id)
                print(json.dumps({"deleted": args.style_id}))
    except (HamError, OSError, ValueError) as exc:
        print(f"{prog} styles {args.styles_command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
