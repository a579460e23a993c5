# Two entry points for a fresh machine; each installs what it needs into .venv (and node_modules).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test sim serve install azurite

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

azurite:
	npm install --no-save --no-audit --no-fund --loglevel=error azurite@3

# The main job: three simulated Azure OpenAI backends, the proxy and real openai SDK traffic.
demo: install
	$(PY) -m lb demo

# Unit, end-to-end (openai SDK over sockets) and Azurite tests, plus the linter.
test: install azurite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# Quota pressure: 3 throttled backends at 50/90/130% load, 1 and 4 `lb serve` processes, memory vs Table
# (Azurite) state, random vs headroom routing (~7.5 min; `python -m bench throttle --scaling` for 1-8 instances).
sim: install azurite
	$(PY) -m bench.throttle_sim

serve: install
	$(PY) -m lb serve
