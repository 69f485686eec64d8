#!/usr/bin/env bash
# Build the Go binaries the local stack and the end-to-end tests run (the collector from
# collector/manifest.yaml, and Jaeger v2) into a cache directory OUTSIDE the repository,
# keyed by version; cached binaries are reused. `--print-paths` shows where they go.
#
# Usage: scripts/build_binaries.sh [all|collector|jaeger] [--print-paths]
#
# The build lives in the package (otel_subflow/stack/_build.py, also
# `python -m otel_subflow.stack.build` from an installed wheel). That file needs only the
# standard library, so it runs here as a script with any Python 3.10+, before a venv exists.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python3}" "$repo_root/otel_subflow/stack/_build.py" "$@"
