"""Logging setup: the one place that configures structlog, plus the redaction processor.

Every other module takes a logger with ``log = get_logger(__name__)`` and logs stable
dotted event names with key-value fields (``log.info("link.session_established",
peer=...)``). Output is a readable console format (colour on a TTY) or JSON lines for
daemons, to stderr by default. Before the renderer, :func:`redact` replaces values
whose key names look secret and summarises raw bytes, so keys and payloads never reach
a log line even when a caller passes them by mistake.

Not here: stdlib ``logging`` handlers or log files (the process's stderr is the log).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, FilteringBoundLogger, Processor

from meshnode.errors import ConfigError

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("console", "json")

REDACTED = "[redacted]"
SENSITIVE_KEY_PARTS = (
    "private",
    "seed",
    "secret",
    "payload",
    "plaintext",
    "cookie",
    "password",
    "token",
)
"""A field whose name contains one of these (case-insensitive) is never logged."""


def redact(_logger: object, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: hide values of secret-looking keys; summarise bytes as a length."""
    for key, value in event_dict.items():
        if any(part in key.lower() for part in SENSITIVE_KEY_PARTS):
            event_dict[key] = REDACTED
        elif isinstance(value, bytes | bytearray):
            event_dict[key] = f"<{len(value)} bytes>"
        elif isinstance(value, memoryview):
            event_dict[key] = f"<{value.nbytes} bytes>"
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at write time (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that remembers the name :func:`get_logger` was called with."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: object) -> _NamedPrintLogger:
        name = args[0] if args and isinstance(args[0], str) else None
        return _NamedPrintLogger(self._file, name)


def _add_logger_name(logger: object, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


def configure_logging(
    *, level: str = "info", fmt: str = "console", stream: TextIO | None = None
) -> None:
    """Set up structlog for the whole process; safe to call again (the last call wins).

    ``level``: debug, info, warning or error. ``fmt``: ``console`` (readable; colour only
    when ``stream`` is a TTY) or ``json`` (one object per line with ``event``, ``level``
    and an ISO-8601 UTC ``timestamp``). ``stream`` defaults to the current stderr.
    """
    if level not in LEVELS:
        raise ConfigError(f"{level!r} is not one of {', '.join(LEVELS)}", key="log.level")
    if fmt not in FORMATS:
        raise ConfigError(f"{fmt!r} is not one of {', '.join(FORMATS)}", key="log.format")
    out: TextIO = stream if stream is not None else cast("TextIO", _CurrentStderr())
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        redact,
    ]
    if fmt == "json":
        # Tracebacks as data, without local variables: locals can hold keys and payloads.
        no_locals = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        processors += [
            structlog.processors.ExceptionRenderer(no_locals),
            structlog.processors.JSONRenderer(),
        ]
    else:
        # plain_traceback, never rich's default (which prints local variables).
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_tty(out), exception_formatter=structlog.dev.plain_traceback
        )
        processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        context_class=dict,
        logger_factory=_NamedPrintLoggerFactory(out),
        # Not cached: module-level loggers must follow a later configure_logging() call.
        cache_logger_on_first_use=False,
    )


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def get_logger(name: str, **initial: object) -> FilteringBoundLogger:
    """A logger whose lines carry ``logger=name`` (pass ``__name__``) and ``initial`` fields.

    Lazy: safe at module level before :func:`configure_logging` runs.
    """
    return cast("FilteringBoundLogger", structlog.get_logger(name, **initial))
