# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# One pip command for every extra: apache-beam caps pillow/protobuf/pyarrow, and the
# resolver only honours those caps when it sees all requirements at once.
EXTRAS ?= convert,beam,test
STAMP := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')

.PHONY: venv demo test test-all test-cluster bench clean

# --no-compile: pip would byte-compile all ~17k modules of torch/jax/beam/...; Python compiles
# (and caches) only the ~4k that are imported, on first import. That needs bytecode writing,
# which some CI images turn off (PYTHONDONTWRITEBYTECODE=1): without it every process would
# compile jax/torch from source again, so the targets here run with it unset.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>/dev/null || true
	$(PIP) install -q --no-compile -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m hipt_jax.demo --out demo_out

# What CI runs: every test not marked slow, on two pytest-xdist workers (one per core).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" --durations=15 tests

# Everything, slow-marked acceptance tests included (full demo, 2-process jobs,
# whole runlocal pretrainings, full-size 4096 px parity).
test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# The multi-host launch tests alone (all but the SLURM extraction job also run in `make test`): a real one-node SLURM
# cluster (installs slurm-wlm and munge with apt-get when missing; needs root) with the sbatch
# script's 2-task pretraining / preemption / extraction jobs, Beam on 2 worker processes, the
# TPU dry run.
test-cluster: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests/test_slurm.py tests/test_data_prep_beam.py tests/test_launch.py

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
