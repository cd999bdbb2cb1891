"""What the engine's ``ham`` sub-commands (``transfer``, ``eval``) share: parameter flags and exit statuses.

:func:`add_param_arguments` makes one flag per :class:`~ham_engine.params.ParamSpec`, with
its bounds or choices and default in ``--help``; :func:`run_command` turns what a
command raises into its exit status and one line on stderr. Importing this module does
not import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ham_engine.params import PARAM_SPECS, ParamError, ParamSpec, TransferParams

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """A user mistake (a missing file, a parameter out of range, ...): exit status 2."""


def add_param_arguments(
    parser: argparse.ArgumentParser, server_defaults: bool, specs: tuple[ParamSpec, ...] = PARAM_SPECS
) -> None:
    """One flag per client parameter (:data:`ham_engine.params.PARAM_SPECS`): ``--steps``, ``--no-gar``, ...

    With ``server_defaults`` (``ham submit``) an unset flag is ``None``, leaving the choice to the
    server; otherwise (``ham transfer``, ``ham eval``) it is the parameter's default.
    """
    group = parser.add_argument_group("HAM parameters")
    for spec in specs:
        flag = spec.name.replace("_", "-")
        if spec.kind is bool:
            # Every switch is on by default: its flag turns it off.
            group.add_argument(f"--no-{flag}", dest=spec.name, action="store_const", const=False,
                               default=None if server_defaults else spec.default, help=f"turn off: {spec.help}")
        else:
            default = "the server's" if server_defaults else repr(spec.default)
            group.add_argument(f"--{flag}", dest=spec.name, type=spec.kind, choices=spec.choices,
                               default=None if server_defaults else spec.default,
                               help=f"{spec.help}; {spec.allowed()} (default: {default})")


def params_from_args(args: argparse.Namespace, specs: tuple[ParamSpec, ...] = PARAM_SPECS) -> dict[str, Any]:
    """The parameters of ``specs`` set on the command line (``None``: not given)."""
    return {spec.name: getattr(args, spec.name) for spec in specs if getattr(args, spec.name, None) is not None}


def transfer_params(args: argparse.Namespace) -> TransferParams:
    """The :class:`~ham_engine.params.TransferParams` of flags made with ``server_defaults=False``; :class:`BadInput`
    names a parameter out of range."""
    try:
        return TransferParams(**{spec.name: getattr(args, spec.name) for spec in PARAM_SPECS})
    except ParamError as exc:
        raise BadInput(str(exc)) from exc


def run_command(prog: str, command: Callable[[], None], interrupted: str = "interrupted") -> int:
    """Run ``command``; return its exit status: 0, 2 for :class:`BadInput`, 130 interrupted, 1 for anything else.

    Every error is one line on stderr, ``PROG: error: ...``; set ``HAM_DEBUG=1`` for the
    traceback of an unexpected one. ``interrupted`` is what Ctrl-C prints after ``PROG:``.
    """
    try:
        command()
    except BadInput as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a fault of ours or of the environment: still one line, not a traceback
        if os.environ.get("HAM_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{prog}: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
