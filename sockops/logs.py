"""Log lines: one per event, readable text or JSON, with the event's fields and its traceback.

Hand-written rather than python-json-logger or structlog: sockops passes an event's fields as one
``extra={"fields": {...}}`` dict and prints them both as ``key=value`` text and as JSON keys,
which either library would also need a custom formatter for; what the formatters must get right
is short and tested in tests/test_logs.py:

* a traceback is never dropped (``log.exception`` and ``exc_info=``): a ``traceback`` key in JSON,
  the indented stack below the line in text;
* a field never overwrites a key the formatter owns (``ts``, ``level``, ``msg``, ``traceback``):
  it is kept as ``field.<name>``, so a pod annotation or an error named ``level`` cannot make a
  warning look like info to a log pipeline that routes on ``level``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

RESERVED = frozenset({"ts", "level", "msg", "traceback", "stack"})
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        return {}
    return {(f"field.{k}" if str(k) in RESERVED else str(k)): v for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        level = record.levelname.lower()
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {level:5} {record.getMessage()} {fields}".rstrip()
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            line += "\n" + "\n".join("    " + s for s in block.splitlines())
        return line


def setup(fmt: str = "text", level: str = "info") -> None:
    """Log to stderr in ``fmt`` (text or json) from ``level`` up; replaces earlier handlers."""
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=LEVELS[level], handlers=[h], force=True)
