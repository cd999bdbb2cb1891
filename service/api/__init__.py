"""The HTTP layer: FastAPI app, routes, request dependencies, upload parsing and schemas.

It translates HTTP to calls on the shared core (:mod:`ham_core`) and holds no business
logic of its own. The worker never imports it; it never imports torch or diffusers.
"""
