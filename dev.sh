#!/usr/bin/env bash
# The two everyday jobs, each setting up .venv first when it is missing or stale:
#   bash dev.sh demo   # the main job on real data from ../shared/data
#   bash dev.sh test   # lint and the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[dev,ray]"
  touch "$venv/.installed"
fi
job="${1:-}"
shift || true
case "$job" in
  demo)
    exec "$venv/bin/histosearch" demo "$@"
    ;;
  test)
    "$venv/bin/ruff" check src tests
    "$venv/bin/ruff" format --check src tests
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash dev.sh demo|test [args]" >&2
    exit 2
    ;;
esac
