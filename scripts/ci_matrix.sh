#!/usr/bin/env bash
# Smoke runs beside the full suite (which runs once, on the default Python): Python 3.10 and
# 3.13 with the newest dependencies pip resolves, and Python 3.11 at the declared lower bounds
# (scripts/lower-bounds.txt). Venvs are kept under the cache directory, outside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${OTEL_SUBFLOW_CACHE:-$HOME/.cache/otel-subflow}"
SMOKE=(tests/test_options.py tests/test_verdict_rules.py tests/test_analysis.py tests/test_journal.py
       tests/test_spans.py tests/test_acl.py tests/test_cli_errors.py tests/test_timeline.py)
log() { printf '[ci_matrix] %s\n' "$*"; }

# An interpreter for a minor version: pyenv's if it has one, else on PATH, else installed by pyenv.
python_for() {
  local minor=$1 path="" found=""
  if command -v pyenv >/dev/null 2>&1; then
    found=$(ls -d "$(pyenv root)/versions/$minor".* 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$found" ] && [ -x "$found/bin/python$minor" ]; then echo "$found/bin/python$minor"; return; fi
  fi
  if path=$(command -v "python$minor") && "$path" -c 'pass' 2>/dev/null; then echo "$path"; return; fi
  command -v pyenv >/dev/null 2>&1 || { log "python$minor not found and no pyenv to install it" >&2; return 1; }
  local full
  full=$(pyenv install --list | sed 's/^ *//' | grep -E "^${minor//./\\.}\.[0-9]+$" | tail -1)
  log "pyenv install $full" >&2
  pyenv install -s "$full" >&2
  echo "$(pyenv root)/versions/$full/bin/python$minor"
}

smoke() {  # name interpreter [pip args...]
  local name=$1 python=$2; shift 2
  local venv="$CACHE/venv-$name"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # the package and what the smoke tests import (not the whole test extra: atheris, say, has
  # no wheel for every Python)
  "$venv/bin/python" -m pip install --quiet -e . pytest pytest-asyncio pytest-timeout hypothesis pyyaml "$@"
  log "$name: $("$venv/bin/python" --version); $("$venv/bin/python" -m pip list --format freeze 2>/dev/null \
    | grep -E '^(opentelemetry-sdk|opentelemetry-instrumentation-redis|redis|click|rich)==' | tr '\n' ' ')"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${SMOKE[@]}"
}

smoke py310 "$(python_for 3.10)"
smoke py313 "$(python_for 3.13)"
smoke lower-bounds "$(python_for 3.11)" --constraint scripts/lower-bounds.txt
log "done"
