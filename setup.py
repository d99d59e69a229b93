"""Builds unionfs' native pieces: the libfuse shim in front of pyfuse3 (unionfs/server/_fuse_shim.c), and
the core's per-name loops of a cold listing (unionfs/core/_native.c; the core does the same in Python
without it).

Everything else is declared in pyproject.toml.
"""
import shlex
import subprocess

from setuptools import Extension, setup


def fuse3_flags(what: str) -> list[str]:
    """pkg-config's answer for fuse3 (libfuse3-dev), or the Debian defaults if it has none."""
    try:
        out = subprocess.run(["pkg-config", what, "fuse3"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"] if what == "--cflags" else ["-lfuse3"]
    return shlex.split(out.stdout)


cflags = fuse3_flags("--cflags")
libs = fuse3_flags("--libs")
setup(
    ext_modules=[
        Extension(
            "unionfs.server._fuse_shim",
            sources=["unionfs/server/_fuse_shim.c"],
            depends=["unionfs/core/packed_stat.h"],
            include_dirs=[f[2:] for f in cflags if f.startswith("-I")],
            extra_compile_args=[f for f in cflags if not f.startswith("-I")] + ["-Wall", "-Wextra"],
            libraries=[f[2:] for f in libs if f.startswith("-l")] + ["dl"],
            library_dirs=[f[2:] for f in libs if f.startswith("-L")],
        ),
        Extension("unionfs.core._native", sources=["unionfs/core/_native.c"],
                  depends=["unionfs/core/packed_stat.h"], extra_compile_args=["-Wall", "-Wextra"]),
    ]
)
