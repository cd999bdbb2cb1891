"""The ``ham`` command: the composition root that wires every part of HAM together.

This is the one package allowed to import all the others (the engine, the shared core, the HTTP
API, the worker and the Python client): ``ham api``, ``ham worker`` and ``ham up`` start the
parts, ``ham transfer``/``ham eval`` run the engine in-process, ``ham submit``/``ham styles`` talk
to a running API through :mod:`ham_client`. Nothing imports this package (an import-linter
contract in ``pyproject.toml`` keeps it at the top).
"""
