#!/usr/bin/env bash
# The test command: set up (idempotent), lint, type-check, then the whole default test suite.
# Extra arguments go to pytest (e.g. --runslow for the long soaks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check unionfs launcher tests perf
echo "== mypy"
.venv/bin/mypy unionfs launcher
echo "== pytest"
set +e
.venv/bin/pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure here" >&2
    exit 1
fi
exit "$rc"
