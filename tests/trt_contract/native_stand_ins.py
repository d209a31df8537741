"""Stand-in shared objects for the native libraries a real TensorRT Python binding links.

The binding wheels (tensorrt-bindings, tensorrt-cu12-bindings, tensorrt-cu13-bindings) are the
real pybind11 modules, but they link libnvinfer.so.N, libnvonnxparser.so.N and
libnvinfer_plugin.so.N (and libnvparsers.so.8 on 8.6), which come in gigabyte wheels that need
a GPU anyway. For the contract suite the binding only has to import: every class, enum,
property and method signature is then the genuine one. This module reads the binding's own
dynamic symbol table (`nm -D --undefined-only`), keeps the symbols that neither the Python
interpreter nor the system libraries it also links provide, and compiles, with gcc, one
library per missing NVIDIA soname that defines them:

- functions: print which GPU-side entry point was reached and abort() (the contract suite
  fakes everything GPU-side above the binding, so reaching one is a suite bug, loudly);
- data symbols (vtables, typeinfo): zeroed objects.

Nothing here runs TensorRT; the stand-ins only satisfy the dynamic linker.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

_DATA_PREFIXES = ("_ZTV", "_ZTI", "_ZTS", "_ZGV", "_ZTT")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed_libraries(binding: Path) -> list[str]:
    """DT_NEEDED sonames of a shared object, in order."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(binding)))


def _system_library_path(soname: str) -> str | None:
    """Where the dynamic linker finds a system library (ldconfig's cache, this machine's ABI first)."""
    found = []
    for line in _run("ldconfig", "-p").splitlines():
        left, _, path = line.strip().partition(" => ")
        if path and left.split(" (")[0] == soname:
            found.append((0 if "x86-64" in left or "AArch64" in left else 1, path))
    return min(found)[1] if found else None


def _defined(path: str) -> set[str]:
    out = _run("nm", "-D", "--defined-only", path)
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def missing_symbols(binding: Path) -> dict[str, list[str]]:
    """{NVIDIA soname: [symbols the binding needs from it]}: the undefined symbols of the
    binding that the interpreter and the system libraries in its DT_NEEDED do not define."""
    needed = needed_libraries(binding)
    nvidia = [n for n in needed if n.startswith("libnv")]
    system: set[str] = set()
    for soname in needed:
        if soname in nvidia:
            continue
        path = _system_library_path(soname)
        if path is None:
            raise RuntimeError(f"{binding}: needs {soname}, which this machine lacks")
        system |= _defined(path)
    wanted: list[str] = []
    for line in _run("nm", "-D", "--undefined-only", str(binding)).splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != "U":
            continue  # weak references may stay unresolved
        name = parts[1]
        if "@" in name:  # versioned: GLIBC_*, GLIBCXX_*, CXXABI_*, GCC_* (system libraries)
            continue
        if name.startswith(("Py", "_Py")) or name in system:
            continue
        wanted.append(name)
    out: dict[str, list[str]] = {n: [] for n in nvidia}
    for name in wanted:
        out[_owner(name, nvidia)].append(name)
    return out


def _owner(symbol: str, nvidia: list[str]) -> str:
    """Which NVIDIA library a symbol comes from (any loaded one would do for the dynamic
    linker; the right one keeps the stand-ins honest)."""
    def lib(prefix: str) -> str | None:
        return next((n for n in nvidia if n.startswith(prefix + ".so")), None)

    if "OnnxParser" in symbol:
        return lib("libnvonnxparser") or nvidia[0]
    if symbol == "initLibNvInferPlugins":
        return lib("libnvinfer_plugin") or nvidia[0]
    if "uffparser" in symbol or "caffeparser" in symbol:
        return lib("libnvparsers") or nvidia[0]
    return lib("libnvinfer") or nvidia[0]


def _source(soname: str, symbols: list[str]) -> str:
    lines = ["#include <stdio.h>", "#include <stdlib.h>",
             "static void reached(const char *name) {",
             f'    fprintf(stderr, "trt-contract: %s in the stand-in {soname} was called: a GPU-side '
             'TensorRT entry point the contract suite does not fake\\n", name);',
             "    abort();", "}"]
    for name in symbols:
        if name.startswith(_DATA_PREFIXES):
            lines.append(f"__attribute__((aligned(64))) char {name}[512];")
        else:
            lines.append(f'void *{name}(void) {{ reached("{name}"); return 0; }}')
    return "\n".join(lines) + "\n"


def build_stand_ins(binding: Path, out_dir: Path) -> dict[str, list[str]]:
    """Compile the stand-ins for `binding` into out_dir (kept when the symbol lists are
    unchanged); returns {soname: symbols}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = missing_symbols(binding)
    for soname, names in symbols.items():
        text = _source(soname, names)
        target = out_dir / soname
        stamp = out_dir / f".{soname}.sha256"
        digest = hashlib.sha256(text.encode()).hexdigest()
        if target.is_file() and stamp.is_file() and stamp.read_text() == digest:
            continue
        src = out_dir / f"{soname}.c"
        src.write_text(text)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", str(target), str(src)],
                       check=True, capture_output=True, text=True)
        stamp.write_text(digest)
    return symbols
