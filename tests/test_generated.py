"""The files written from the code's tables (``python -m ham_cli.codegen``) are current, and follow a new parameter."""

from __future__ import annotations

from ham_cli.codegen import GENERATED, ROOT, api_docs_with_table, client_params_module, eval_docs_with_flags, stale
from ham_engine.params import PARAM_SPECS, ParamSpec
from service.api.submission import REQUEST_SPECS


def test_every_generated_file_is_current() -> None:
    assert stale() == [], "run: python -m ham_cli.codegen"
    assert set(GENERATED) == {"ham_client/params.py", "ham_client/error_codes.py", "docs/api.md", "docs/evaluation.md"}


def test_a_new_parameter_reaches_the_client_types_and_the_docs_table() -> None:
    added = ParamSpec("detail", float, 0.5, "how much detail to keep", 0.0, 1.0)
    other = ParamSpec("mode", str, "a", "", choices=("a", "b"))
    specs = (*REQUEST_SPECS, added, other)
    module = client_params_module(specs)
    assert "    detail: float\n" in module and '    mode: Literal["a", "b"]\n' in module
    docs = api_docs_with_table((ROOT / "docs" / "api.md").read_text(), specs)
    assert "| `detail` | float | `0.5` | 0.0..1.0 | how much detail to keep |" in docs
    # Only the table changed: the rest of the document is kept as it was.
    assert docs.replace("| `detail` | float | `0.5` | 0.0..1.0 | how much detail to keep |\n", "").replace(
        '| `mode` | str | `a` | a, b |  |\n', "") == (ROOT / "docs" / "api.md").read_text()


def test_the_client_module_is_valid_python_with_one_key_per_parameter() -> None:
    namespace: dict = {}
    exec(compile(client_params_module(), "params.py", "exec"), namespace)
    assert list(namespace["TransferOptions"].__annotations__) == [spec.name for spec in REQUEST_SPECS]


def test_a_new_engine_parameter_is_listed_among_the_eval_flags() -> None:
    added = (ParamSpec("detail", float, 0.5, "", 0.0, 1.0), ParamSpec("sharpen", bool, True, ""))
    docs = eval_docs_with_flags((ROOT / "docs" / "evaluation.md").read_text(), (*PARAM_SPECS, *added))
    listed = " ".join(docs.split("**The engine's parameters**", 1)[1].split("\n\n", 1)[0].split())
    assert "`--teachers`, `--detail`, `--no-sini`" in listed
    assert "`--no-guide-student`, `--no-sharpen`; `--device`" in listed
