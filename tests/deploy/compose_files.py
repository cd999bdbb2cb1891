"""Read docker-compose files and Dockerfiles the way Docker does, for the offline deploy tests.

Only what the repository's files use: ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}``
interpolation (``$$`` for a literal ``$``), YAML merge keys, the ``!reset`` tag of override
files, and the override merge rules for mappings (merged) and scalars/sequences (replaced).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_RESET = object()
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's ``!reset`` tag (drop the key inherited from earlier files)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: _RESET)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute ``${VAR:-default}``-style variables in every string, as Compose does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(5)
        operator, default = match.group(3), match.group(4) or ""
        current = env.get(name)
        if operator == ":-" and not current:
            return default
        if operator == "-" and current is None:
            return default
        return current or ""

    return _VARIABLE.sub(substitute, value)


def _override(base: Any, extra: Any) -> Any:
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            if value is _RESET:
                out.pop(key, None)
            else:
                out[key] = _override(out.get(key), value)
        return out
    return extra


def load_compose(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge compose files left to right and interpolate with ``env`` (default: no variables set)."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _override(merged, yaml.load(path.read_text(), Loader=_ComposeLoader))
    # Extension fields (x-*) only hold YAML anchors; Compose ignores them after parsing.
    return interpolate(merged, env if env is not None else {})


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict (the list ``KEY=VALUE`` form too)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


# --- Dockerfiles -------------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM … stage of a Dockerfile: its base image (ARGs resolved) and its instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, instruction: str) -> str | None:
        values = [arg for ins, arg in self.instructions if ins == instruction]
        return values[-1] if values else None

    def all(self, instruction: str) -> list[str]:
        return [arg for ins, arg in self.instructions if ins == instruction]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, later ones winning."""
        out: dict[str, str] = {}
        for line in self.all("ENV"):
            for token in shlex.split(line):
                key, sep, value = token.partition("=")
                if sep:
                    out[key] = value
        return out


def exec_form(argument: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD (ValueError for shell form)."""
    value = json.loads(argument)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not an exec-form array: {argument!r}")
    return value


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, argument = line.partition(" ")
        instruction = instruction.upper()
        argument = argument.strip()
        if instruction == "FROM":
            parts = argument.split()
            image = interpolate(parts[0], global_args)
            stages.append(Stage(base=image, name=parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
        elif not stages:
            if instruction == "ARG":
                key, _, default = argument.partition("=")
                global_args[key] = default
        else:
            stages[-1].instructions.append((instruction, argument))
    return global_args, stages


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: ``*`` and ``?`` stay within a path segment, ``**/`` spans any."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether ``.dockerignore`` drops ``path``: last matching rule wins, ``!`` re-includes, and a
    rule matching a parent directory applies to everything under it (as Docker's matcher does)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def read_dockerignore(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
