"""JSON logs, one object a line, carrying pipeline and operation ids from the current context."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# Set by the operation runner and the gateway; every log line in that context carries them.
log_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "log_context", default=None
)

_SECRET_WORDS = ("secret", "password", "token", "authorization")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            **(log_context.get() or {}),
        }
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(
                {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in extra.items()}
            )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel("WARNING")


def bind(**fields: str) -> contextvars.Token:
    return log_context.set({**(log_context.get() or {}), **{k: v for k, v in fields.items() if v}})
