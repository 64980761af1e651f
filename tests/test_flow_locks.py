"""Stage locks left by a killed run are removed; locks of live processes are respected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import textwrap

from pipeline.flow import StageLockManager

KEY = "k" * 64


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from pathlib import Path
            from pipeline.flow import StageLockManager
            assert StageLockManager(Path({str(tmp_path)!r})).acquire_lock({KEY!r}, holder="killed-run")
            print("locked", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        manager = StageLockManager(tmp_path)
        # While the holder lives, the lock holds.
        assert manager.is_locked(KEY)
        assert not manager.acquire_lock(KEY, holder="next-run", acquire_timeout=0.3)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert (tmp_path / f"{KEY}.lock").exists(), "SIGKILL leaves the lock file behind"
    assert manager.acquire_lock(KEY, holder="next-run", acquire_timeout=5)
    assert manager.is_lock_holder(KEY, "next-run")
    manager.release_lock(KEY, "next-run")
    assert not (tmp_path / f"{KEY}.lock").exists() and not (tmp_path / f"{KEY}.owner").exists()


def test_lock_without_owner_file_is_stale_only_when_old(tmp_path):
    lock = tmp_path / f"{KEY}.lock"
    lock.write_text('{"holder":"old-alol","expiration":null}')
    manager = StageLockManager(tmp_path)
    assert manager.is_locked(KEY), "a fresh lock may be between its two writes"
    old = time.time() - StageLockManager.orphan_seconds - 5
    os.utime(lock, (old, old))
    assert not manager.is_locked(KEY)
    assert not lock.exists()


def test_lock_of_another_host_is_respected(tmp_path):
    manager = StageLockManager(tmp_path)
    assert manager.acquire_lock(KEY, holder="elsewhere")
    owner = tmp_path / f"{KEY}.owner"
    owner.write_text('{"host": "some-other-host", "pid": 999999, "started": 0.0, "holder": "elsewhere"}')
    assert StageLockManager(tmp_path).is_locked(KEY)
    assert not StageLockManager(tmp_path).acquire_lock(KEY, holder="here", acquire_timeout=0.3)
