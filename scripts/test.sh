#!/usr/bin/env bash
# The whole suite: lint, types, then pytest (Redis, SMTP and, where possible, Asterisk tiers).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check prepaid agi ami_listener policy shell tests bench testbed || exit 1
"$VENV/bin/mypy" prepaid agi ami_listener policy shell testbed tests bench || exit 1
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit $rc
