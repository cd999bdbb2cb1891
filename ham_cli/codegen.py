"""The files written from the code's own tables, and the command that rewrites them.

A transfer parameter is declared once, as a field of :class:`ham_engine.params.TransferParams`
(an output option: in :data:`ham_core.output.OUTPUT_SPECS`); an error code once, as a class of
the catalogue (:mod:`service.api.errors`). The schema, the form and JSON parsing, ``ham submit``
and ``ham transfer`` and ``ham eval`` flags and the playground read those tables at run time;
four files cannot, and are written from them here:

- ``ham_client/params.py`` — the client's ``TransferOptions`` (the client imports nothing of the server);
- ``ham_client/error_codes.py`` — one client exception type per error code;
- the parameter table of ``docs/api.md`` and the engine's flags listed in ``docs/evaluation.md``.

``python -m ham_cli.codegen`` rewrites them; ``--check`` only says which are stale (exit 1), as the
test suite does.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from ham_engine.params import PARAM_SPECS, ParamSpec, params_table
from service.api.errors import client_codes_module
from service.api.submission import REQUEST_SPECS

ROOT = Path(__file__).resolve().parents[1]
_TABLE_HEAD = "| Parameter | Type | Default | Allowed | What |"
_EVAL_PARAGRAPH = "**The engine's parameters**"


def client_params_module(specs: tuple[ParamSpec, ...] = REQUEST_SPECS) -> str:
    """The source of ``ham_client/params.py``: a ``TypedDict`` with one key per request parameter."""
    lines = [
        '"""The per-request parameters of a transfer, typed: what ``submit(**params)`` accepts.',
        "",
        "Generated from the server's parameter table (``TransferParams`` in ``ham_engine.params`` and",
        "``OUTPUT_SPECS`` in ``ham_core.output``) by ``python -m ham_cli.codegen``: do not edit. The client",
        "imports nothing of the server (it needs neither torch nor the service), so the table is written",
        "out here; the test suite fails when this file is stale.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Literal, TypedDict",
        "",
        "",
        "class TransferOptions(TypedDict, total=False):",
        '    """Every optional parameter of ``POST /v1/transfers`` '
        '(the server\'s defaults apply to those left out)."""',
        "",
    ]
    for spec in specs:
        kind = f"Literal[{', '.join(json.dumps(c) for c in spec.choices)}]" if spec.choices else spec.kind.__name__
        lines.append(f"    {spec.name}: {kind}")
    return "\n".join(lines) + "\n"


def api_docs_with_table(text: str, specs: tuple[ParamSpec, ...] = REQUEST_SPECS) -> str:
    """``docs/api.md`` with its parameter table replaced by the one of ``specs``."""
    start = text.index(_TABLE_HEAD)
    end = text.find("\n\n", start)
    end = len(text) if end == -1 else end
    return text[:start] + params_table(specs).rstrip("\n") + text[end:]


def eval_docs_with_flags(text: str, specs: tuple[ParamSpec, ...] = PARAM_SPECS) -> str:
    """``docs/evaluation.md`` with the engine's flags listed in its parameters paragraph (numbers and
    choices first, then the ``--no-`` switches of the booleans, which default on)."""
    start = text.index(_EVAL_PARAGRAPH)
    end = text.index("\n\n", start)
    paragraph = " ".join(text[start:end].split("\n"))
    head, rest = paragraph.split("default): ", 1)
    tail = rest.split("; `--device`", 1)[1]
    dashed = [(spec.kind is bool, spec.name.replace("_", "-")) for spec in specs]
    flags = [f"`--{name}`" for boolean, name in dashed if not boolean]
    flags += [f"`--no-{name}`" for boolean, name in dashed if boolean]
    paragraph = f"{head}default): {', '.join(flags)}; `--device`{tail}"
    return text[:start] + textwrap.fill(paragraph, 100, break_long_words=False, break_on_hyphens=False) + text[end:]


# What each written file holds, as a function of its current text.
GENERATED: dict[str, Callable[[str], str]] = {
    "ham_client/params.py": lambda _: client_params_module(),
    "ham_client/error_codes.py": lambda _: client_codes_module(),
    "docs/api.md": api_docs_with_table,
    "docs/evaluation.md": eval_docs_with_flags,
}


def updates(root: Path = ROOT) -> dict[str, str]:
    """The generated files whose text differs from what the tables give, each with the text it should have."""
    found = {}
    for name, render in GENERATED.items():
        current = (root / name).read_text(encoding="utf-8")
        wanted = render(current)
        if wanted != current:
            found[name] = wanted
    return found


def stale(root: Path = ROOT) -> list[str]:
    """The names of the generated files that are out of date."""
    return list(updates(root))


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated files (``--check``: list the stale ones and exit 1 if any)."""
    parser = argparse.ArgumentParser(prog="python -m ham_cli.codegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is stale")
    args = parser.parse_args(argv)
    outdated = updates()
    if args.check:
        for name in outdated:
            print(f"stale: {name} (run: python -m ham_cli.codegen)", file=sys.stderr)
        return 1 if outdated else 0
    for name, text in outdated.items():
        (ROOT / name).write_text(text, encoding="utf-8")
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
