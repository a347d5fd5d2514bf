"""Typed request and response bodies of the HTTP API, one module per feature.

Requests are validated strictly (a wrong type is a 400, never coerced; unknown fields are
refused); responses are the models FastAPI documents in `/openapi.json`.
"""
