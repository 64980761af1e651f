"""pipeline.allocator: the `alol` command re-executes itself once under mimalloc, and its children inherit it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.allocator import VARIABLE, allocator_environment, mimalloc_library
from pipeline.mkl_dispatch import VARIABLE as DISPATCH

REPO = Path(__file__).resolve().parent.parent
LIBRARY = mimalloc_library()
needs_mimalloc = pytest.mark.skipif(LIBRARY is None, reason="cmeel-mimalloc is installed only on x86-64 Linux")


def test_the_wheel_is_there_where_pyproject_installs_it():
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert LIBRARY is not None and os.path.isfile(LIBRARY) and os.path.basename(LIBRARY) == "libmimalloc.so"


# MKL's own code path choice (pipeline.mkl_dispatch, tested in test_mkl_dispatch.py): LD_PRELOAD holds the allocator only.
VENDOR = {DISPATCH: "vendor"}


@needs_mimalloc
def test_environment_puts_mimalloc_first_and_keeps_what_the_user_set():
    env = allocator_environment({"LD_PRELOAD": "/opt/other.so", "MIMALLOC_PURGE_DELAY": "5", "PATH": "/bin", **VENDOR})
    assert env["LD_PRELOAD"] == f"{LIBRARY} /opt/other.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "5" and env["PATH"] == "/bin"
    fresh = allocator_environment(VENDOR)
    assert fresh["LD_PRELOAD"] == LIBRARY and fresh["MIMALLOC_PURGE_DELAY"] == "-1"
    assert allocator_environment(fresh) == fresh  # applied once: the re-executed process finds nothing to change
    assert allocator_environment(allocator_environment({})) == allocator_environment({})  # with the MKL library too


@needs_mimalloc
def test_system_takes_only_mimalloc_out():
    env = allocator_environment({"LD_PRELOAD": f"{LIBRARY}:/opt/other.so", **VENDOR}, "system")
    assert env["LD_PRELOAD"] == "/opt/other.so" and env[VARIABLE] == "system"
    assert "LD_PRELOAD" not in allocator_environment({"LD_PRELOAD": LIBRARY, **VENDOR}, "system")
    assert allocator_environment({VARIABLE: "system", **VENDOR}) == {VARIABLE: "system", **VENDOR}


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="ALOL_ALLOCATOR='tcmalloc': expected one of mimalloc, system"):
        allocator_environment({VARIABLE: "tcmalloc"})


PROBE = """
import os, subprocess, sys
os.write(1, b"started\\n")
from pipeline.allocator import exec_with_allocator
exec_with_allocator()
mapped = lambda: "libmimalloc" in open("/proc/self/maps").read()
child = subprocess.run([sys.executable, "-c", "print('libmimalloc' in open('/proc/self/maps').read())"],
                       capture_output=True, text=True).stdout.strip()
print(f"pid={os.getpid()} mapped={mapped()} child={child}")
"""


def _probe(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", VARIABLE, "MIMALLOC_PURGE_DELAY", DISPATCH)}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=120)


@needs_mimalloc
def test_the_process_re_executes_once_under_mimalloc_and_its_children_inherit_it():
    done = _probe()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count("started") == 2  # the first start, then the re-executed one; no loop
    assert lines[-1].endswith("mapped=True child=True")


@needs_mimalloc
def test_system_keeps_glibc_malloc_in_the_process_and_its_children():
    done = _probe(**{VARIABLE: "system", **VENDOR})  # nothing to preload: no re-execution
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count("started") == 1 and lines[-1].endswith("mapped=False child=False")


def test_an_unknown_choice_stops_the_command_with_exit_2():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), VARIABLE: "jemalloc"}, timeout=120)
    assert done.returncode == 2 and "ALOL_ALLOCATOR='jemalloc'" in done.stderr and not done.stdout
