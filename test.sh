#!/usr/bin/env bash
# Sets everything up (first time only) and runs the whole test suite: unit, integration, browser.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
