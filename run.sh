#!/usr/bin/env bash
# Sets everything up (first time only) and runs the server. Flags go to server.py (see --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python server.py "$@"
