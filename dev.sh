#!/usr/bin/env bash
# The everyday jobs, each setting up .venv first when it is missing or stale:
#   bash dev.sh demo   # the main job on real data from ../shared/data
#   bash dev.sh test   # lint and the test suite (extra arguments go to pytest)
#   bash dev.sh serve  # the search service and viewer on the demo archive (built if missing)
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
job="${1:-}"
# What each job needs: demo and serve the package alone, test the dev and ray extras too.
case "$job" in
  test) extras="[dev,ray]" stamp="$venv/.installed-test" ;;
  *) extras="" stamp="$venv/.installed" ;;
esac
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "dev.sh: setting up $venv for '${job:-set-up}' (first run only; measured sizes and times in the README)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --progress-bar on -e ".$extras"
  touch "$stamp"
fi
# The serve page's npm packages (OpenSeadragon, Swagger UI), pinned by the lock file, never
# committed; without npm only `serve` (and its tests) lack them.
web=src/histosearch/server/static
if [ ! -f "$web/node_modules/.package-lock.json" ] || [ "$web/package-lock.json" -nt "$web/node_modules/.package-lock.json" ]; then
  if command -v npm > /dev/null; then
    (cd "$web" && npm ci --no-audit --no-fund --loglevel=error)
  else
    echo "dev.sh: npm not found; the serve page's packages are not installed" >&2
  fi
fi
shift || true
case "$job" in
  demo)
    exec "$venv/bin/histosearch" demo "$@"
    ;;
  test)
    "$venv/bin/ruff" check src tests docs
    "$venv/bin/ruff" format --check src tests docs
    "$venv/bin/lint-imports" --no-cache > /dev/null || "$venv/bin/lint-imports" --no-cache
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  serve)
    if [ ! -f demo-output/archive/catalog.sqlite ]; then
      "$venv/bin/histosearch" demo
    fi
    exec "$venv/bin/histosearch" serve --archive demo-output/archive "$@"
    ;;
  *)
    echo "usage: bash dev.sh demo|test|serve [args]" >&2
    exit 2
    ;;
esac
