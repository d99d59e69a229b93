#!/usr/bin/env bash
# The main job on the bundled example: AUFS's classic demo, A/{a,x} over B/{b,x}.
# Sets everything up first (system packages, .venv, the package), then mounts, lists, reads,
# writes (copy-up and a whiteout), unmounts, and shows what landed in the writable branch.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/setup.sh"
unionfs="$here/.venv/bin/unionfs"
work=$(mktemp -d /tmp/unionfs-demo.XXXXXX)
cleanup() {
    if grep -q " $work/union " /proc/self/mountinfo; then "$unionfs" umount "$work/union" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cp -a "$here/examples/aufs-demo/A" "$here/examples/aufs-demo/B" "$work/"
mkdir "$work/union"
set -x
"$unionfs" mount "$work/A:$work/B" "$work/union"
ls -l "$work/union"
cat "$work/union/a" "$work/union/b" "$work/union/x"
echo "appended through the union" >> "$work/union/b"   # copy-up of B/b into A
rm "$work/union/x"                                     # leaves a whiteout for B/x in A
ls -la "$work/union"
"$unionfs" umount "$work/union"
ls -la "$work/A" "$work/B"
cat "$work/A/b"
{ set +x; } 2>/dev/null
echo "demo: OK (B is unchanged; A holds the copy of b and the whiteout .wh.x)"
