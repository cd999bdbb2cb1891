"""The HTTP service: the FastAPI application in :mod:`service.api`.

It builds on the shared core (:mod:`ham_core`) and never imports the worker, torch or the
``ham`` command (:mod:`ham_cli`); import-linter contracts in ``pyproject.toml`` keep it so.
"""
