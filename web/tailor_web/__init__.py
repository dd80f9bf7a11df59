"""Tailor's web face: an HTTP/JSON API over the gateway's gRPC API, and the dashboard page that uses it.

`python -m tailor_web` serves both. The process is a gRPC client of the gateway (through the SDK's
connection code) and forwards each caller's bearer token, so authentication, project isolation and rate
limits stay the gateway's own; it keeps no state of its own. See docs/web.md.
"""
