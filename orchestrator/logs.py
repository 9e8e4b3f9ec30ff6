"""One log line per event, with the chat id and message id as `key=value` (or JSON lines when asked)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record


def _line(record: Record) -> str:
    extras = " ".join(f"{key}={{extra[{key}]}}" for key in record["extra"])
    return ("{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}" + (f"  {extras}" if extras else "")
            + "\n{exception}")


def setup_logging(json_lines: bool = False, level: str = "INFO") -> None:
    logger.remove()
    if json_lines:
        logger.add(sys.stderr, level=level, serialize=True)
    else:
        logger.add(sys.stderr, level=level, format=_line)
