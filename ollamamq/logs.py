# -*- test-case-name: tests.test_logs -*-
"""
The daemon's log formats: twistd's text lines, or (C{--log-format json}) one JSON object
per line for journald, Loki and friends.

A JSON line has C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message} (the event
formatted as the text line would read) and, for the access line of a request, every field
of its L{ollamamq.requestlog.RequestRecord} as keys of its own (the request's arrival, Unix
seconds, as C{arrived}); a logged failure adds C{traceback}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import FileLogObserver, formatEvent

from ollamamq.requestlog import COLUMNS


def formatJSONLine(event: dict[str, Any]) -> str:
    """
    One log event as a JSON line.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    if event.get("access"):
        for column in COLUMNS:
            # The request's arrival must not replace the line's own time.
            record["arrived" if column == "time" else column] = event.get(column)
        record["cancelled"] = bool(event.get("cancelled"))
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str) + "\n"


def jsonLineObserver(out: TextIO) -> FileLogObserver:
    """
    A log observer writing JSON lines to C{out}.
    """
    return FileLogObserver(out, formatJSONLine)


def jsonObserverFactory() -> FileLogObserver:
    """
    For twistd's C{logger} option: JSON lines on standard output (where C{twistd -n}
    logs, so systemd's journal gets them).
    """
    return jsonLineObserver(sys.stdout)
