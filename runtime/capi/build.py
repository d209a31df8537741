"""Build libdeedsr: `build_library(out_dir)` writes libdeedsr.so, deedsr.h and deedsr.pc.

cffi's embedding mode compiles libdeedsr.c (the ABI of deedsr.h, in C) together with the
declarations of the Python half (bindings.py) into one shared library linked to this
interpreter's libpython. The library records this interpreter's path (`sys.executable`): on the
first call it starts an embedded interpreter as if that python had been run, so it sees the same
environment (a venv's site-packages included) without PYTHONPATH or an activated venv.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from .. import __version__

HERE = Path(__file__).resolve().parent
MODULE = "_deedsr_capi"  # the embedded cffi module's name in sys.modules
LIBRARY = "libdeedsr.so"
HEADER = "deedsr.h"
PKGCONFIG = "deedsr.pc"

# Declarations shared with cffi: the Python half implements the _deedsr_py_* functions
# (extern "Python"); the C half implements _deedsr_set_error and _deedsr_owns_python.
_PYTHON_API = """
typedef int32_t (*deedsr_progress_fn)(void *user, int32_t step, int32_t steps);
int _deedsr_py_open(const char *engine_dir, const char *backend, uint64_t *handle);
int _deedsr_py_upscale(uint64_t handle, const uint8_t *rgb, int32_t width, int32_t height,
                       int32_t stride_bytes, uint64_t seed, int32_t steps, float eta,
                       deedsr_progress_fn progress, void *user, uint8_t *out, int32_t out_stride_bytes);
void _deedsr_py_close(uint64_t handle);
"""
_C_API = """
void _deedsr_set_error(const char *message);
int _deedsr_owns_python(void);
"""

# Runs once inside the embedded interpreter. It must not raise: cffi would print the traceback
# to the host's stderr. libdeedsr.c imports the same modules first and reports a failure itself.
_INIT_CODE = f"""
from {MODULE} import ffi, lib
try:
    from deedsr.runtime.capi import bindings
    bindings.install(ffi, lib)
except BaseException as e:
    lib._deedsr_set_error(("deedsr: the embedded runtime failed to start (%s: %s)"
                           % (type(e).__name__, e)).encode("utf-8", "replace"))
"""

# Only the ABI is exported; cffi's and libpython's symbols stay local to the library.
_VERSION_SCRIPT = "{ global: deedsr_*; local: *; };\n"


class BuildError(RuntimeError):
    """The library cannot be built here (no cffi, no compiler, no Python headers or libpython)."""


def _c_string(text: str) -> str:
    """A C string literal for any text (non-ASCII bytes as octal escapes)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _check_toolchain() -> None:
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise BuildError(f"no Python.h in {include}; install the Python development headers "
                         f"(Debian/Ubuntu: apt-get install python{sys.version_info[0]}-dev)")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BuildError(f"{sys.executable} was built without a shared libpython; libdeedsr needs one "
                         "(a distribution's python, pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared, conda)")
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        raise BuildError("no C compiler (cc or gcc) on PATH; install one (apt-get install gcc)")


def build_library(out_dir: str | Path, python: str | None = None, verbose: bool = False) -> Path:
    """Compile libdeedsr.so and write deedsr.h and deedsr.pc into out_dir; returns the .so path.

    python: the interpreter the library starts (default: this one, sys.executable). It must be
    this Python version; a venv of it is the usual choice.
    """
    try:
        import cffi
    except ImportError:
        raise BuildError("building libdeedsr needs cffi: pip install 'deedsr[capi]'") from None
    _check_toolchain()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = os.path.abspath(python or sys.executable)  # absolute, symlinks kept: a venv's bin/python
    libdir = sysconfig.get_config_var("LIBDIR")

    ffibuilder = cffi.FFI()
    ffibuilder.embedding_api(_PYTHON_API)
    ffibuilder.cdef(_C_API)
    ffibuilder.embedding_init_code(_INIT_CODE)
    with tempfile.TemporaryDirectory(prefix="deedsr-capi-") as tmp:
        script = Path(tmp) / "exports.map"
        script.write_text(_VERSION_SCRIPT)
        source = (f"#define DEEDSR_BUILD_PYTHON {_c_string(python)}\n"
                  f"#define DEEDSR_VERSION_STRING {_c_string(__version__)}\n"
                  + (HERE / "libdeedsr.c").read_text())
        ffibuilder.set_source(
            MODULE, source,
            include_dirs=[str(HERE)],
            extra_compile_args=["-O2"],
            # rpath: libpython is found where this interpreter's is, without LD_LIBRARY_PATH.
            extra_link_args=[f"-Wl,-rpath,{libdir}", f"-Wl,--version-script={script}",
                             f"-Wl,-soname,{LIBRARY}"],
        )
        try:
            built = ffibuilder.compile(tmpdir=tmp, target=LIBRARY, verbose=verbose)
        except Exception as e:  # distutils' CompileError/LinkError and cffi's own errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"compiling libdeedsr failed ({first}); rerun with --verbose to see the compiler") from None
        _install(Path(built), out / LIBRARY)
    _install_text(out / HEADER, (HERE / HEADER).read_text())
    _install_text(out / PKGCONFIG, pkgconfig(out))
    return out / LIBRARY


def pkgconfig(out: Path) -> str:
    return (f"prefix={out}\n"
            "libdir=${prefix}\n"
            "includedir=${prefix}\n\n"
            "Name: deedsr\n"
            "Description: DeeDSR x4 super-resolution (the deedsr runtime behind a C ABI)\n"
            f"Version: {__version__}\n"
            "Libs: -L${libdir} -Wl,-rpath,${libdir} -ldeedsr\n"
            "Cflags: -I${includedir}\n")


def _install(src: Path, dst: Path) -> None:
    """Copy into place through a temporary file and a rename: never a half-written library
    (a running service that has the old one mapped keeps its inode)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)


def _install_text(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)
