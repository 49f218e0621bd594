"""How the worker's log lines look: JSON (Powertools' structured lines, what Lambda, containers
and log shippers read) or human-readable text on a terminal.

``auto`` picks text when the log stream is a terminal and JSON otherwise, so the Lambda function,
the container and anything redirected to a file keep JSON. The text form keeps every key of
the JSON line (``key=value`` after the message); it also turns off the CloudWatch EMF metric
lines (JSON blobs meant for CloudWatch, not people), unless ``POWERTOOLS_METRICS_DISABLED`` is
set explicitly.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

__all__ = ["LOG_FORMATS", "TextFormatter", "configure_logging", "resolve_log_format"]

LOG_FORMATS = ("auto", "json", "text")
ENV_VAR = "DOGBREEDS_LOG_FORMAT"
#: Keys of a Powertools line that the text form leaves out (they are the same on every line or
#: already in the line's prefix).
_PREFIX_KEYS = ("level", "location", "message", "timestamp", "service", "sampling_rate", "xray_trace_id",
                "cold_start", "function_name", "function_memory_size", "function_arn", "function_request_id")


_TRACE_KEYS = ("exception", "exception_name", "stack_trace")


class TextFormatter(LambdaPowertoolsFormatter):
    """``HH:MM:SS LEVEL   message  key=value ...``: Powertools' keys and extras, one line."""

    def serialize(self, log: dict[str, Any]) -> str:
        stamp = time.strftime("%H:%M:%S")
        extras = " ".join(f"{k}={_text(v)}" for k, v in log.items() if k not in _PREFIX_KEYS + _TRACE_KEYS)
        line = f"{stamp} {str(log.get('level', '')):<7} {log.get('message', '')}"
        line = f"{line}  {extras}" if extras else line
        return f"{line}\n{log['exception']}" if log.get("exception") else line  # the traceback as Python prints it


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def resolve_log_format(log_format: str, stream: IO | None) -> str:
    """``json`` or ``text`` for ``auto|json|text`` (``auto``: text on a terminal)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format != "auto":
        return log_format
    try:
        return "text" if stream is not None and stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or unusual streams
        return "json"


def configure_logging(log_format: str = "auto") -> str:
    """Set the worker logger's format (``worker.observability.logger``); returns ``json`` or ``text``."""
    from worker.observability import SERVICE, logger

    handler = logger.registered_handler
    resolved = resolve_log_format(log_format, getattr(handler, "stream", None))
    if resolved == "text":
        handler.setFormatter(TextFormatter(service=SERVICE))
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    elif isinstance(handler.formatter, TextFormatter):  # back to JSON (a second CLI call in one process)
        handler.setFormatter(LambdaPowertoolsFormatter(service=SERVICE))
    return resolved
