# Every target installs what it needs first; `make test` works on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint bench sounds lock demo demo-web clean

setup:
	bash scripts/setup.sh

test: setup
	bash scripts/test.sh

lint: setup
	$(VENV)/bin/ruff check prepaid agi ami_listener policy shell tests bench testbed
	$(VENV)/bin/mypy prepaid agi ami_listener policy shell testbed tests bench

bench: setup
	$(PY) -m bench

sounds:
	bash scripts/make-sounds.sh

lock:
	bash scripts/lock.sh

demo: setup
	$(PY) -m testbed.demo

demo-web: setup  # the "My account" page alone: no Asterisk, no root
	$(PY) -m testbed.webdemo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
