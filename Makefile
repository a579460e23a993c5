# Entry points for a fresh machine: `make demo` and `make test` install what they need into .venv (and
# node_modules) first, and again only when a requirements file changes. The check targets (lint, typecheck,
# test-unit) use what is installed and never install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
UNIT := not e2e and not azurite and not bench
# Test files run on this many workers (pytest-xdist; 0: one process). The suite mostly waits on sockets and
# timers, so two workers halve its wall time even on 2 cores; a file's tests stay together (module fixtures).
WORKERS ?= 2

.PHONY: demo test check lint typecheck test-unit sim serve install azurite funchost

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(INSTALLED)

node_modules/.bin/azurite-table:
	npm install --no-save --no-audit --no-fund --loglevel=error azurite@3

azurite: node_modules/.bin/azurite-table

# tests/test_funchost.py serves the app through the real Functions Python worker, with
# ../shared/tools/funchost when the clone has it beside it (else those tests skip). Its venv is
# built here with the rest of what the tests need, not inside the first test that starts it.
FUNCHOST_SETUP := ../shared/tools/funchost/setup
FUNCHOST_VENV ?= /tmp/funchost-venv
$(FUNCHOST_VENV)/.lb-ready: requirements.txt
	@if [ -x $(FUNCHOST_SETUP) ]; then FUNCHOST_VENV=$(FUNCHOST_VENV) $(FUNCHOST_SETUP) . >/dev/null && touch $@; fi

funchost: $(FUNCHOST_VENV)/.lb-ready

# The main job: three simulated Azure OpenAI backends, the proxy and real openai SDK traffic.
demo: install
	$(PY) -m lb demo

# What CI runs: the linter, the type checker, then every test (unit, end-to-end over sockets, Azurite, bench smoke).
test: install azurite funchost check
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# Checks only, with what is installed.
check: lint typecheck

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(PY) -m mypy

# The unit layer alone (what no marker of pyproject.toml marks): no sockets, no servers, seconds.
test-unit:
	$(PY) -m pytest -q -m "$(UNIT)"

# Quota pressure: 3 throttled backends at 50/90/130% load, 1 and 4 `lb serve` processes, memory vs Table
# (Azurite) state, random vs headroom routing (~7.5 min; `python -m bench throttle --scaling` for 1-8 instances).
sim: install azurite
	$(PY) -m bench.throttle_sim

serve: install
	$(PY) -m lb serve
