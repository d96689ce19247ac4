# mailsys: `make run` starts the development instance, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TRIAL_ARGS ?= tests

.PHONY: run test install venv bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

# A regular (non-editable) install, so that twisted/plugins/mailsys_plugin.py
# lands in site-packages where `twistd` looks for plugins.
install: venv
	$(BIN)/python -m pip install --quiet '.[test]'

run: install
	$(BIN)/twistd -n mailsys

test: install
	$(BIN)/python -b -m twisted.trial $(TRIAL_ARGS)

lint: install
	$(BIN)/ruff check mailsys twisted bench
	$(BIN)/ruff format --check mailsys twisted bench

bench: install
	$(BIN)/python bench/smtp_delivery.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp*
