#!/usr/bin/env bash
# Runs the whole test suite (all tiers) after installing what it needs. Extra arguments go to
# pytest, e.g. `scripts/test.sh -m "not slow"` for the quick tier.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/setup.sh"
cd "$REPO"
# Build the test models once (cached under ~/.cache/edge-agent/models, keyed by recipe).
python scripts/build_test_models.py tiny
python scripts/build_test_models.py tiny-vision
python scripts/build_test_models.py smollm2
exec python -m pytest "$@"
