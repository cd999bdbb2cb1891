"""Shared core: what both the HTTP API and the worker use.

Settings, the job store, object storage, webhooks and the public job resource. Nothing here
imports the HTTP layer (:mod:`service.api`) or torch; of the engine it imports only the
torch-free :mod:`ham_engine.params`. The layering is enforced by import-linter contracts in
``pyproject.toml`` (checked by ``tests/test_layers.py``).
"""
