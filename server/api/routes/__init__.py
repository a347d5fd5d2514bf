"""The API's routers, one module per feature; `server.api.app` registers them all."""
