#!/usr/bin/env bash
# Installs everything a fresh Debian machine lacks: system packages, then the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
# The web page's browser tests: Debian's headless Chromium and its chromedriver (Selenium).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${need[*]} (run as root, or install them with apt-get)" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
lock=requirements/test.lock  # every package of '.[test]', pinned with hashes (scripts/lock.sh)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q --require-hashes -r "$lock"
  # The project itself: its dependencies are all in the lock, setuptools (the build) too.
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
fi
