# shadowvmm: `make run` runs the main job, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

PLUGINS := plugins/vhost-user plugins/vdpa plugins/faulty plugins/nested

.PHONY: run test lint setup peers bench soak fuzz clean plugin-check user-fixtures-check

# The core and the first-party plugins, from this clone (nothing is fetched for them).
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' $(addprefix -e ,$(PLUGINS))
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/shadowvmm run configs/default.toml

peers:
	@if [ "$$(id -u)" = 0 ]; then scripts/install-peers.sh; \
	else echo "not root: skipping Debian peer install (scripts/install-peers.sh)"; fi

# The vDPA lane runs its in-VM tests on both Debian kernels: 6.12 (SUSPEND+RESUME)
# and 6.1 (SUSPEND only: the reset-and-replay fallback).
export SHADOWVMM_VDPA_VM_KERNELS ?= 6.12 6.1

# The gates: ruff, mypy, and the import graph / code shape (scripts/archcheck.py).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) scripts/archcheck.py

test: setup peers lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) --no-print-directory plugin-check
	$(MAKE) --no-print-directory user-fixtures-check

# Each plugin installed on its own into a fresh venv (the core from this clone), its tests run
# from its folder; the VM lane there boots one kernel, the main run above covers both.
plugin-check:
	SHADOWVMM_VDPA_VM_KERNELS=6.12 scripts/plugin-check.sh

# The pytest plugin's fixtures as a user gets them: non-editable shadowvmm[pytest] and the
# vhost-user plugin in a fresh venv, a config-less test file outside the clone (about 20 s).
user-fixtures-check:
	scripts/user-fixtures-check.sh

# Every benchmarks/*.py (the convention is in benchmarks/_common.py), one JSON document with each
# figure against its goal, and bench.png (value/goal per goal). BENCH_ARGS: e.g. --quick, --profile.
BENCH_ARGS ?=
bench: setup peers
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# Every fuzz target (fuzz/targets.py) under atheris, about 1.1 M inputs in all (FUZZ_RUNS: per target).
FUZZ_RUNS ?=
fuzz: setup
	$(PY) -m pip install -q 'atheris>=2.3'
	$(PY) fuzz/run.py $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS))

# The model-based lifecycle test (shadowvmm.testing.chaos) for SOAK_MINUTES against qsd, the
# reference back-end and in-process; prints one line per seed and a JSON summary at the end.
SOAK_MINUTES ?= 30
soak: setup peers
	$(PY) -m shadowvmm.testing.chaos --minutes $(SOAK_MINUTES) --steps 60

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
