"""The temporary folders a stage writer works in, named after the process that writes them.

`.<key>.partial-<host>-<pid>-<start>-<hex>` (`start` the process's start time in 1/100 s) beside the
output folder, so that a writer can tell a folder left by a killed process on this host from one still
being written, and remove the former; other hosts' folders (a shared file system) are left alone.
stages.io creates and commits them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import psutil

log = logging.getLogger("alol.io")

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:partial|stale)-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")
_UNOWNED = re.compile(r"^\.(?P<name>.+)\.(?:partial|stale)-[0-9a-f]{8}$")  # named by alol before owners were
UNOWNED_STALE_SECONDS = 24 * 3600.0
"""A temporary folder without an owner in its name counts as abandoned once it is this old."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())


def _process_start(pid: int) -> int:
    """A process's start time in 1/100 s (the kernel's clock ticks): with the pid, it names one process."""
    return round(psutil.Process(pid).create_time() * 100)


def temporary_name(final: Path, kind: str) -> Path:
    """`.<name>.<kind>-<host>-<pid>-<start>-<hex>` beside `final`: a folder this process owns."""
    pid = os.getpid()
    return final.with_name(f".{final.name}.{kind}-{_host()}-{pid}-{_process_start(pid)}-{uuid.uuid4().hex[:8]}")


def _abandoned(folder: Path) -> bool:
    """Whether a temporary folder's writer is gone: a process on this host that no longer runs (its pid
    dead or reused by a process started at another time), or, for a name without an owner, older than
    UNOWNED_STALE_SECONDS. Another host's folders are never abandoned as far as this host can tell."""
    owned = _TEMPORARY.match(folder.name)
    if owned is None:
        try:
            return _UNOWNED.match(folder.name) is not None and time.time() - folder.stat().st_mtime > UNOWNED_STALE_SECONDS
        except FileNotFoundError:
            return False
    if owned["host"] != _host():
        return False
    try:
        owner = psutil.Process(int(owned["pid"]))
        if owner.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped: it writes nothing any more
            return True
        # psutil's create_time rests on the boot time, which clock adjustments can move by a second.
        return abs(round(owner.create_time() * 100) - int(owned["start"])) > 100
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def remove_abandoned_temporaries(stage_dir: Path) -> list[Path]:
    """Remove the temporary folders (`.*.partial-*`, `.*.stale-*`) under `stage_dir` whose writer is gone."""
    removed = []
    for folder in sorted(stage_dir.glob(".*.partial-*")) + sorted(stage_dir.glob(".*.stale-*")):
        if folder.is_dir() and _abandoned(folder):
            log.warning("removing %s, left by a stage run that no longer runs", folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
