"""hmem on many replicas: Ray Serve engine replicas behind an ingress that routes by residency.

`app` builds the Serve application, `command` runs it (`hmem serve --replicas N`); `ingress`,
`placer`, `bridge` and `metrics` are the ingress's side, `replica` the engine replica's;
`placement` ranks replicas for a path, `router` is the Serve request router that applies it,
`routing_state` what the router and the ingress share. Design: docs/cluster.md.
"""
