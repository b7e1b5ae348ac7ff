"""Which instance this process is."""

from __future__ import annotations

import os
import re
import socket

from parley.settings import Settings

_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")  # the characters PARLEY_INSTANCE_ID allows


def instance_id(settings: Settings) -> str:
    """PARLEY_INSTANCE_ID, else `<hostname>-<pid>`: unique per process, so two workers of one
    machine are two instances (each holds its own media sockets)."""
    if settings.instance_id:
        return settings.instance_id
    return _UNSAFE.sub("_", f"{socket.gethostname()}-{os.getpid()}")[:64]
