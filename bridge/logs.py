"""Logging setup, called once by the CLI: structlog key-value events rendered as JSON lines (or
readable on a terminal), with stdlib logging from aio-pika and aiohttp routed through the same."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import Processor

from bridge.config import Settings

# The packages whose loggers follow the configured level; every other logger is a library's.
OWN_LOGGERS = ("bridge", "consumers", "schemas")
# Libraries (aio-pika, aiormq, aiohttp's access log, asyncio) are heard from only at WARNING+:
# an access-log line per webhook would drown the bridge's own events.
LIBRARY_LEVEL = logging.WARNING


# Anything shaped like local@domain, a valid address or not (a refused one is personal too).
_EMAIL = re.compile(r"([^\s@'\"<>(),;:]{1,64})@([^\s@'\"<>(),;:]+)")
_PHONE_KEYS = frozenset({"phone", "sms_phone"})
_EMAIL_KEYS = frozenset({"email", "address"})


def mask_email(text: str) -> str:
    """``jan.kowalski@example.com`` → ``j***@example.com``: enough to tell customers apart in
    an incident, not enough to mail them."""
    return _EMAIL.sub(lambda m: f"{m.group(1)[0]}***@{m.group(2)}", text)


def mask_phone(text: str) -> str:
    digits = [i for i, ch in enumerate(text) if ch.isdigit()]
    keep = set(digits[-3:])
    return "".join(ch if not ch.isdigit() or i in keep else "*" for i, ch in enumerate(text))


def mask_personal_data(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Logs never carry a whole e-mail address or phone, wherever it appears (an error message
    quoting a refused field, say)."""
    for key, value in event.items():
        if not isinstance(value, str):
            continue
        if key in _PHONE_KEYS or (key in _EMAIL_KEYS and "@" not in value):
            # An SMS subscriber's address is a phone.
            event[key] = mask_phone(value)
        elif key in _EMAIL_KEYS or "@" in value:
            event[key] = mask_email(value)
    return event


def _shared_processors() -> list[Processor]:
    return [
        # First, so that event_id/app_id/queue bound at a request or message boundary reach
        # every line logged inside it, the libraries' lines included.
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        mask_personal_data,
    ]


def _renderer(log_format: str, stream: TextIO) -> list[Processor]:
    console = log_format == "console" or (log_format == "auto" and stream.isatty())
    if console:
        return [structlog.dev.ConsoleRenderer()]
    return [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]


class DropClientProtocolErrors(logging.Filter):
    """aiohttp logs every malformed request (a header over the limit, a bad request line) at
    ERROR with a traceback: anyone could fill the logs. The client got its 400; keep quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr by default, so that stdout
    stays free for command output) at ``settings.log_level``; libraries at WARNING or above."""
    out = stream if stream is not None else sys.stderr
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Filters below-level calls before any processor runs: debug lines cost nothing.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(settings.log_format, out),
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, LIBRARY_LEVEL))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, DropClientProtocolErrors) for f in server_log.filters):
        server_log.addFilter(DropClientProtocolErrors())
