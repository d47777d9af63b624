#!/usr/bin/env bash
# Regenerates requirements/test.lock, what `make test` installs: every package of '.[test]'
# pinned with hashes, for any platform, Python 3.11. pyproject.toml keeps its open ranges.
# Uses uv (from PATH, else installed into a throwaway venv).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=$(command -v uv || true)
if [ -z "$uv" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q uv
  uv="$tmp/venv/bin/uv"
fi
mkdir -p requirements
"$uv" pip compile pyproject.toml --extra test --universal --python-version 3.11 \
  --generate-hashes --no-progress -q -o requirements/test.lock "$@"
echo "lock: $(grep -c '^[a-z]' requirements/test.lock) packages pinned in requirements/test.lock"
