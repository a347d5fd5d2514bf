"""The HTTP API (FastAPI): routes, request and response schemas, errors, access, middleware.

`app.create_app(settings)` builds the app; its routes call the serving layer (`server.serving`)
once per request and format what it returns (docs/serving.md).
"""
