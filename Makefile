# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# One pip command for every extra: apache-beam caps pillow/protobuf/pyarrow, and the
# resolver only honours those caps when it sees all requirements at once.
EXTRAS ?= convert,beam,test
STAMP := $(VENV)/.installed-$(shell echo $(EXTRAS) | tr ',' '-')

.PHONY: venv demo test test-all bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 2>/dev/null || true
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m hipt_jax.demo --out demo_out

# Fast suite (slow-marked tests excluded); `make test-all` runs everything.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
