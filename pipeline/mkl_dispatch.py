"""MKL's code paths on AMD processors: a two-function library that alol's processes preload there.

torch's CPU build links Intel's oneMKL, which picks its kernels by CPU vendor before features: on an AMD
processor it runs its generic code path even where the CPU has AVX2 or AVX-512 (MKL_VERBOSE names the path,
"Intel(R) Architecture processors"). MKL asks two exported functions, `mkl_serv_intel_cpu` and
`mkl_serv_intel_cpu_true`, whether it runs on an Intel CPU; a preloaded library whose definitions answer yes
makes it choose by the CPU's features
(the AVX-512 path on an AMD EPYC with AVX-512: "Intel(R) Advanced Vector Extensions 512"). On a 2-core AMD
EPYC that halved the time of the small matmuls of a decode step and cut the 49,152-row output layer from 18.6
to 3.8 ms (bench/decode.py: 63 against 162 tokens/s). Sums round differently in the last bits, as with any
other kernel choice; results stay the same from run to run on one machine.

`make setup` compiles the library into the environment (`python -m pipeline.mkl_dispatch build`, with the C
compiler `cc`; without one nothing is built and MKL keeps its own choice). `preload_environment` adds it to
LD_PRELOAD on Linux with an AMD CPU (pipeline.allocator puts it in every `alol` process's environment);
`ALOL_MKL_DISPATCH=vendor` leaves MKL's own choice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

VARIABLE = "ALOL_MKL_DISPATCH"
CHOICES = ("features", "vendor")
LIBRARY_NAME = "libalol_mkl_dispatch.so"
SOURCE = """\
/* alol (pipeline/mkl_dispatch.py): MKL chooses its kernels by the CPU's features, on any vendor's CPU.
   Both are needed: with the first alone MKL runs its SSE2 path, with the second alone its generic one. */
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
"""


def preloads(env: Mapping[str, str]) -> list[str]:
    """The libraries in `env`'s LD_PRELOAD (separated by spaces or colons, as the dynamic loader reads it)."""
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def with_preloads(env: Mapping[str, str], libraries: list[str]) -> dict[str, str]:
    """`env` with LD_PRELOAD holding `libraries`, or without LD_PRELOAD when there are none."""
    out = dict(env)
    if libraries:
        out["LD_PRELOAD"] = " ".join(libraries)
    else:
        out.pop("LD_PRELOAD", None)
    return out


def library_path(prefix: str | None = None) -> Path:
    """Where `build` puts the library: the environment's lib folder (sys.prefix: the .venv)."""
    return Path(prefix or sys.prefix) / "lib" / "alol" / LIBRARY_NAME


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The `vendor_id` of the first processor (`AuthenticAMD`, `GenuineIntel`), or None where there is none."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def build(target: Path | None = None, compiler: str | None = None) -> Path | None:
    """Compile SOURCE into `target` (default `library_path()`), atomically; None, with a line on stderr, when no
    C compiler is found (`cc`, or the `CC` variable's)."""
    target = Path(target or library_path())
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        print(f"alol: no C compiler ({compiler}); {target.name} not built, MKL keeps its own code path choice",
              file=sys.stderr)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "mkl_dispatch.c", Path(tmp) / LIBRARY_NAME
        source.write_text(SOURCE)
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)], check=True)
        os.replace(built, target)
    return target


def preload_environment(env: Mapping[str, str], vendor: str | None = None, library: Path | None = None) -> dict[str, str]:
    """`env` with the library appended to LD_PRELOAD where it applies: Linux, an AMD CPU (`vendor`, default
    /proc/cpuinfo's), the library built, and ALOL_MKL_DISPATCH not `vendor`. Otherwise `env` unchanged."""
    choice = env.get(VARIABLE) or "features"
    if choice not in CHOICES:
        raise ValueError(f"{VARIABLE}={choice!r}: expected one of {', '.join(CHOICES)}")
    library, present = str(library or library_path()), preloads(env)
    if choice == "vendor":
        return with_preloads(env, [p for p in present if p != library])
    if sys.platform != "linux" or (vendor or cpu_vendor()) != "AuthenticAMD" or not Path(library).is_file():
        return dict(env)
    return with_preloads(env, present if library in present else [*present, library])


def describe(env: Mapping[str, str] | None = None) -> str:
    """How this process's MKL picks its kernels, for benchmark headers."""
    if any(Path(p).name == LIBRARY_NAME for p in preloads(os.environ if env is None else env)):
        return f"MKL kernels by the CPU's features ({LIBRARY_NAME} preloaded, {cpu_vendor()})"
    return f"MKL's own kernel choice ({cpu_vendor()})"


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python -m pipeline.mkl_dispatch build")
    built = build()
    if built is not None:
        print(f"alol: built {built}")
