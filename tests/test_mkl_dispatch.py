"""pipeline.mkl_dispatch: the preloaded library that makes MKL choose its kernels by the CPU's features on AMD CPUs."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import mkl_dispatch
from pipeline.allocator import allocator_environment

REPO = Path(__file__).resolve().parent.parent
# CI installs a C compiler (.ci/run): there these tests fail rather than skip without one.
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and os.environ.get("CI") != "true",
                                    reason="no C compiler (cc) on this machine")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    built = mkl_dispatch.build(tmp_path_factory.mktemp("mkl") / mkl_dispatch.LIBRARY_NAME)
    assert built is not None and built.is_file()
    return built


@needs_compiler
def test_the_library_answers_yes_to_both_of_mkls_vendor_questions(library):
    loaded = ctypes.CDLL(str(library))
    assert loaded.mkl_serv_intel_cpu() == 1 and loaded.mkl_serv_intel_cpu_true() == 1


PROBE = """
import numpy, torch
torch.manual_seed(0)
a, b = torch.randn(96, 160), torch.randn(160, 112)
error = ((a @ b).double() - a.double() @ b.double()).abs().max().item()
print(f"error={error:.3g}")
"""


@needs_compiler
def test_under_the_library_mkl_runs_a_feature_path_and_its_products_are_right(library):
    """MKL_VERBOSE names the code path MKL took: never the generic one ("Intel(R) Architecture processors", what an
    AMD CPU gets without the library) but an instruction set's (AVX2 or AVX-512 on any current x86-64 CPU)."""
    env = {**os.environ, "LD_PRELOAD": str(library), "MKL_VERBOSE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    banner = next(line for line in (done.stdout + done.stderr).splitlines() if line.startswith("MKL_VERBOSE oneMKL"))
    assert "Intel(R) Architecture processors" not in banner and "Advanced Vector Extensions" in banner, banner
    error = float(done.stdout.split("error=")[1].split()[0])
    assert error < 1e-3


def test_the_library_is_preloaded_on_amd_cpus_only_and_once(tmp_path):
    library = tmp_path / mkl_dispatch.LIBRARY_NAME
    library.write_bytes(b"")
    if sys.platform != "linux":
        assert mkl_dispatch.preload_environment({}, "AuthenticAMD", library) == {}
        return
    amd = mkl_dispatch.preload_environment({"LD_PRELOAD": "/opt/a.so"}, "AuthenticAMD", library)
    assert amd["LD_PRELOAD"] == f"/opt/a.so {library}"
    assert mkl_dispatch.preload_environment(amd, "AuthenticAMD", library) == amd  # applied once
    assert mkl_dispatch.preload_environment({"PATH": "/bin"}, "GenuineIntel", library) == {"PATH": "/bin"}
    assert mkl_dispatch.preload_environment({}, "AuthenticAMD", tmp_path / "not-built.so") == {}
    vendor = mkl_dispatch.preload_environment({**amd, mkl_dispatch.VARIABLE: "vendor"}, "AuthenticAMD", library)
    assert vendor["LD_PRELOAD"] == "/opt/a.so"  # MKL's own choice: the library taken out, other preloads kept
    with pytest.raises(ValueError, match="ALOL_MKL_DISPATCH='intel': expected one of features, vendor"):
        mkl_dispatch.preload_environment({mkl_dispatch.VARIABLE: "intel"}, "AuthenticAMD", library)


def test_the_cpu_vendor_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert mkl_dispatch.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    assert mkl_dispatch.cpu_vendor(str(tmp_path / "missing")) is None


def test_without_a_compiler_nothing_is_built_and_it_says_so(tmp_path, capsys):
    assert mkl_dispatch.build(tmp_path / "lib.so", compiler="no-such-cc") is None
    assert not (tmp_path / "lib.so").exists()
    assert "no C compiler (no-such-cc)" in capsys.readouterr().err


@pytest.mark.skipif(mkl_dispatch.cpu_vendor() != "AuthenticAMD" or not mkl_dispatch.library_path().is_file(),
                    reason="the library is preloaded on an AMD CPU, once `make setup` has built it")
def test_on_this_amd_cpu_the_alol_environment_preloads_the_built_library():
    env = allocator_environment({})
    assert str(mkl_dispatch.library_path()) in env["LD_PRELOAD"].split()
