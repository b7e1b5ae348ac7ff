"""Logging setup shared by the commands."""

from __future__ import annotations

import logging

from rich.logging import RichHandler


def configure(level: str = "info", *, events_to_console: bool = True) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=True, show_path=False)],
        force=True,
    )
    if not events_to_console:
        logging.getLogger("parley.events").setLevel(logging.WARNING)
