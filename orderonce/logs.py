"""Structured JSON logs: one object per line, with event_id and order_id when known."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_EXTRA_FIELDS = (
    "event_id",
    "order_id",
    "outcome",
    "reason",
    "duration_ms",
    # batch mode (worker/protocol/batch.py)
    "batch",
    "events",
    "outcomes",
    "handed_back",
    "batch_duration_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
