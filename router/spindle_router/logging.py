"""Log output of the launcher and the router: readable text by default, JSON lines with --json-output.

One line per record either way, written to stderr, so a log shipper can read the JSON form and a person
can read the text form. Fields beyond the message (a shard's `rank`, for instance) are passed with
`extra=` and appear as keys in JSON and as `key=value` in text. A line logged while an HTTP request is
handled carries that request's `request_id` (and `trace_id` when tracing), from `REQUEST_ID`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from spindle_router.config import env_default

# Attributes every LogRecord has; anything else on a record came from `extra=` and is worth printing.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


# Set by the HTTP layer for the handling of one request; contextvars follow it into the tasks it awaits.
REQUEST_ID: ContextVar[str | None] = ContextVar("spindle_request_id", default=None)


class RequestContextFilter(logging.Filter):
    """Puts the current request's id and trace id on every record logged while handling it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
            from spindle_router.telemetry import current_trace_id

            trace_id = current_trace_id()
            if trace_id is not None:
                record.trace_id = trace_id
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """`{"timestamp", "level", "target", "message", ...extras}`, one object per line (TGI's flattened form)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            head, sep, tail = line.partition("\n")  # keep extras on the message line, before a traceback
            line = head + " " + " ".join(f"{k}={v}" for k, v in extras.items()) + sep + tail
        return line


def setup_logging(json_output: bool = False, level: str | None = None) -> None:
    """Configure the root logger once per process. `level` defaults to env LOG_LEVEL, else INFO."""
    level_name = (level or env_default("log_level", "info") or "info").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_name if isinstance(logging.getLevelName(level_name), int) else "INFO")
    # aiohttp's access log is one line per request; TGI does not log requests at info either.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
