"""`python -m tailor_web`: the HTTP/JSON API and the dashboard, in front of one gateway.

TAILOR_GATEWAY=host:port   the gateway (else the local stack's, from `tailor up`'s stack.json)
TAILOR_WEB_HOST            the address to listen on (127.0.0.1; 0.0.0.0 in a container)
TAILOR_WEB_PORT            the port (8080)
TAILOR_TLS_CA (+ _CERT/_KEY)  TLS to the gateway, as for the SDK and the CLI
"""

from __future__ import annotations

import os

import uvicorn

from tailor_web.app import create_app
from tailor_web.gateway import Gateway, gateway_address

DEFAULT_PORT = 8080


def main() -> None:
    app = create_app(Gateway(gateway_address()))
    host = os.environ.get("TAILOR_WEB_HOST", "127.0.0.1")
    port = int(os.environ.get("TAILOR_WEB_PORT", str(DEFAULT_PORT)))
    # Access logs carry paths and statuses only: a token travels in a header, never in a URL.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
