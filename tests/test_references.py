"""Every document a file of the repository names is in the repository.

A reference to a Markdown file (``docs/method.md``, ``evaluation.md#section``, ``README.md``)
is looked up relative to the naming file's folder and to the repository root, and a bare
name (``deploy.md`` in a test about the deploy docs) among the tracked files' names; one
found nowhere is a dangling pointer for a reader, as a private notes file cited from the code.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A path-like word ending in .md: letters, digits, ., _, -, / (and ../), not part of a longer word.
MD_REFERENCE = re.compile(r"(?<![\w./-])((?:\.{1,2}/|[\w-]+/)*[\w.-]+\.md)\b")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".json", ".js", ".html", ".css", ".cfg", ".ini", ".txt",
                 ".sh", ""}
# Files our tools write (``ham eval``'s table), not documents of the repository.
NOT_REFERENCES = {"table.md", "OUT/table.md"}


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in listed.splitlines() if line]


def test_no_file_names_a_markdown_document_that_is_not_in_the_repository() -> None:
    tracked = {path.relative_to(ROOT).as_posix() for path in _tracked_files()}
    names = {Path(path).name for path in tracked}
    dangling = []
    for path in _tracked_files():
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        folder = path.parent.relative_to(ROOT)
        for number, line in enumerate(text.splitlines(), 1):
            for reference in MD_REFERENCE.findall(line):
                if reference in NOT_REFERENCES or "*" in reference or ("/" not in reference and reference in names):
                    continue
                candidates = {(folder / reference).as_posix(), reference.lstrip("./")}
                normalised = {Path(*_resolve(candidate)).as_posix() for candidate in candidates if _resolve(candidate)}
                if not normalised & tracked:
                    dangling.append(f"{path.relative_to(ROOT)}:{number}: {reference}")
    assert not dangling, "files name documents that are not in the repository:\n" + "\n".join(dangling)


def _resolve(relative: str) -> list[str]:
    parts: list[str] = []
    for part in relative.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return []  # above the repository: not one of ours
            parts.pop()
        else:
            parts.append(part)
    return parts


def test_the_private_notes_are_never_cited() -> None:
    found = subprocess.run(["git", "grep", "-lE", r"PAPER\.md|ARCHITECTURE\.md|STYLE\.md|\.\./shared"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not found, found
