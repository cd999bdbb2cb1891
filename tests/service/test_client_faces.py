"""``ham_client``'s two faces are one protocol: the blocking and the asyncio client say the same thing.

Every call of the API is written once in :mod:`ham_client.protocol` (how it becomes a request, how
the answer becomes a result); each client's method only sends it. This checks that the two faces
cannot drift: the same public methods, the same signatures and docstrings, and, for the calls of
the API, the same body once ``await`` is taken out. And that the typed parameters of ``submit``
are the server's, name by name and type by type.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing

from ham_client import AsyncClient, Client, TransferOptions
from service.api.submission import REQUEST_SPECS

# Methods whose bodies differ by more than `await`: the transport (the async one uses async
# context managers and iterators), and the context-manager dunders.
_TRANSPORT = {"_send", "_follow_events", "wait", "close"}


def _public(cls: type) -> dict[str, typing.Any]:
    return {name: member for name, member in vars(cls).items() if callable(member) and not name.startswith("_")}


def _without_await(function: typing.Any) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))

    class Strip(ast.NodeTransformer):
        def visit_Await(self, node: ast.Await) -> ast.AST:
            return self.visit(node.value)

    function_node = tree.body[0]
    body = Strip().visit(ast.Module(body=function_node.body, type_ignores=[]))
    return ast.dump(body)


def test_both_clients_have_the_same_public_calls_with_the_same_signatures_and_docs():
    sync, asyncio_ = _public(Client), _public(AsyncClient)
    assert set(sync) == set(asyncio_)
    for name, method in sync.items():
        other = asyncio_[name]
        assert inspect.iscoroutinefunction(other), name
        assert not inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(other), name
        assert inspect.getdoc(method) == inspect.getdoc(other), name
    assert {"create_style", "get_style", "list_styles", "delete_style", "submit"} <= set(sync)


def test_every_api_call_has_the_same_body_in_both_clients_but_for_await():
    for name in set(_public(Client)) - _TRANSPORT:
        assert _without_await(getattr(Client, name)) == _without_await(getattr(AsyncClient, name)), name


def test_submits_typed_parameters_are_the_servers():
    hints = typing.get_type_hints(TransferOptions)
    assert list(hints) == [spec.name for spec in REQUEST_SPECS]
    for spec in REQUEST_SPECS:
        hint = hints[spec.name]
        if spec.choices is not None:
            assert typing.get_origin(hint) is typing.Literal and set(typing.get_args(hint)) == set(spec.choices)
        else:
            assert hint is spec.kind, spec.name
    assert str(inspect.signature(Client.submit).parameters["params"].annotation) == "Unpack[TransferOptions]"
