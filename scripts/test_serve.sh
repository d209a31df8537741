#!/usr/bin/env bash
# The serve extra's tests (tests/test_serve.py: a real Triton server on loopback ports) in their
# own environment: PyTriton 0.7.0 needs numpy < 2, the main environment stays on numpy 2.
# Run from anywhere after the main environment is set up; its deedsr-export (which needs torch,
# absent from the serve environment) writes the engine directory the tests serve.
#   DEEDSR_EXPORT  the deedsr-export to use (default: the one on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
export_cmd=${DEEDSR_EXPORT:-deedsr-export}
python3 -m venv .venv-serve
.venv-serve/bin/python -m pip install -q -e '.[serve]' pytest
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! "$export_cmd" --checkpoint deedsr/assets/demo --out "$work/demo-128" --max-size 128 --precision fp32 \
        >"$work/export.log" 2>&1; then
    cat "$work/export.log" >&2
    exit 1
fi
DEEDSR_SERVE_TEST_ENGINES="$work/demo-128" .venv-serve/bin/python -m pytest -q -p no:cacheprovider tests/test_serve.py
