#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: system packages, a venv in .venv, the package.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in fuse3 libfuse3-dev pkg-config attr acl fuse-overlayfs busybox-static python3-venv python3-dev podman runc bubblewrap uidmap mmdebstrap docker-registry apache2-utils skopeo openssl; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # docker-registry ships a service on port 5000: the tests start registries of their own.
    if [[ " ${need[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi
# The venv is made from Debian's own python3 when it is 3.11 or newer: Debian builds it with
# profile-guided optimisation and LTO into a statically linked binary, and on it the FUSE server
# starts ~20% faster (the imports of trio and pyfuse3) and serves ~10% faster than on a default
# pyenv or source build (shared libpython, no PGO) that may come first on PATH.  A venv made
# from another interpreter is made again.
py=python3
if /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=/usr/bin/python3
fi
base='import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'
want=$("$py" -c "$base")
have=$(.venv/bin/python -c "$base" 2>/dev/null || true)  # empty when the venv is missing or broken
if [ -e .venv ] && [ "$have" != "$want" ]; then
    echo "setup: making .venv again from $want" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
# The libfuse shim and the core's C loops are compiled in place by the editable install: build
# them again when their source changed; install again when pyproject.toml did (the console
# scripts' entry points).
shim=$(ls unionfs/server/_fuse_shim.*.so 2>/dev/null | head -n1 || true)
# The checkout goes on sys.path through a plain .pth line (editable_mode=compat): the default
# editable finder is imported by every interpreter start, ~10 ms of each `unionfs run` launch.
if [ -z "$shim" ] || [ unionfs/server/_fuse_shim.c -nt "$shim" ] || [ setup.py -nt "$shim" ] ||
   [ unionfs/core/_native.c -nt "$shim" ] || [ unionfs/core/packed_stat.h -nt "$shim" ] ||
   [ pyproject.toml -nt .venv/bin/unionfs ] ||
   compgen -G '.venv/lib/python3*/site-packages/__editable___unionfs_*_finder.py' >/dev/null ||
   ! .venv/bin/python -c 'import unionfs.server._fuse_shim, unionfs.core._native, pyfuse3, pytest_trio, hypothesis, zstandard, tqdm, httpx' 2>/dev/null; then
    # pip's and setuptools' chatter (the compat-mode notice among it) is shown only on failure.
    log=$(mktemp)
    if ! { .venv/bin/pip install -q --upgrade pip &&
           .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: installing the package into .venv failed (above)" >&2
        exit 1
    fi
    rm -f "$log"
fi
# The mount client in C (unionfs/server/fastclient.c): `unionfs mount` and `unionfs-overlay` through
# the resident server without starting Python; anything else it hands to the Python command beside it.
front=
if [ ! -x .venv/bin/unionfs-fastclient ] || [ unionfs/server/fastclient.c -nt .venv/bin/unionfs-fastclient ]; then
    # Linked statically where libc.a is there: no dynamic loader at each start (0.85 -> 0.63 ms a
    # command here, for every mount and unmount).
    if command -v cc >/dev/null 2>&1 &&
       { cc -O2 -Wall -static -o .venv/bin/unionfs-fastclient.tmp unionfs/server/fastclient.c 2>/dev/null ||
         cc -O2 -Wall -o .venv/bin/unionfs-fastclient.tmp unionfs/server/fastclient.c; }; then
        mv -f .venv/bin/unionfs-fastclient.tmp .venv/bin/unionfs-fastclient
    else
        echo "setup: no C compiler: unionfs mount and unionfs-overlay start Python for every mount" >&2
    fi
fi
[ -x .venv/bin/unionfs-fastclient ] && front="$PWD/.venv/bin/unionfs-fastclient"
# mount(8) hands `-t fuse.unionfs-overlay` to mount.fuse3, which looks the program up on PATH.
if [ "$(id -u)" -eq 0 ]; then
    for prog in unionfs unionfs-overlay; do
        ln -sfn "${front:-$PWD/.venv/bin/$prog}" "/usr/local/bin/$prog"
    done
fi
