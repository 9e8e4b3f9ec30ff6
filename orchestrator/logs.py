"""One log line per event, with the chat id and message id as `key=value` (or JSON lines when asked)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from collections.abc import Sequence

    from loguru import Record


def _line(record: Record) -> str:
    extras = " ".join(f"{key}={{extra[{key}]}}" for key in record["extra"])
    return ("{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}" + (f"  {extras}" if extras else "")
            + "\n{exception}")


def setup_logging(json_lines: bool = False, level: str = "INFO", secrets: Sequence[str] = ()) -> None:
    """Log to stderr; every known secret is masked, and tracebacks never show variables' values."""
    logger.remove()

    def mask(record: Record) -> None:
        for secret in secrets:
            record["message"] = record["message"].replace(secret, "***")

    logger.configure(patcher=mask)
    if json_lines:
        logger.add(sys.stderr, level=level, serialize=True, diagnose=False, backtrace=False)
    else:
        logger.add(sys.stderr, level=level, format=_line, diagnose=False, backtrace=False)
