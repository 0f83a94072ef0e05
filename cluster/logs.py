"""Logs an operator can query: JSON lines with a stable schema, or one readable line each on a
terminal. `cluster serve --log-format json|text|auto` (auto: JSON unless stderr is a TTY).

Every record carries `ts` (ISO 8601, UTC), `level`, `logger` and `message`; records about a
request add the fields below. The router writes one `request` line per finished request (the
access log, logger `pdcluster.access`), one `failover` line per failed attempt a policy went
past, and one `request_failed` line per request that ended in an error:

    event            request | failover | request_failed
    request_id       the client's (or the router's) id
    tenant           who sent it (null until tenants exist)
    status           ok | error
    finish_reason    stop | length | abort (ok lines)
    error, reason    what failed and its class (error lines; reasons as in
                     pdcluster:requests_failed_total)
    prompt_tokens, completion_tokens, cached_tokens
    queue_ms, prefill_ms, transfer_ms, first_decode_ms, ttft_ms, e2e_ms
    kv_bytes, kv_reads, kv_descriptors, kv_read_ms     the KV pull that served the stream
    prefill_instance, decode_instance, num_failovers
    attempt, instance, action                          failover lines: which try, where, next
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS = logging.getLogger("pdcluster.access")
FORMATS = ("auto", "json", "text")


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line on the access logger."""
    ACCESS.log(level, name, extra={"fields": {"event": name, **fields}})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`ts level logger message key=value ...` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        pairs = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event" and v is not None)
        line = f"{_iso(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line} {pairs}" if pairs else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(log_format: str = "auto", level: int = logging.INFO) -> logging.Handler:
    """One handler on the root logger, on stderr, in the chosen format."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {log_format!r}")
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_pdcluster", False)]:
        root.removeHandler(old)
    handler._pdcluster = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _iso(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"
