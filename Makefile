# Two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair; on the build machines this resolves from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STUDY ?= studies/prune_vs_slim.yaml
# where the demo's cells run: two Dask worker processes (one thread each) use both cores of the
# build machine twice as well as one process with two threads; CLUSTER=serial for one process
CLUSTER ?= local:2
export OMP_NUM_THREADS ?= 2

.PHONY: venv test lint typecheck pytest demo evidence bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check mapex_analysis tests benchmarks
	$(VENV)/bin/ruff format --check mapex_analysis tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy mapex_analysis

pytest: venv
	$(VENV)/bin/pytest -q --timeout=900 tests

test: lint typecheck pytest

demo: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/mapex-study run $(STUDY) --cluster $(CLUSTER)
	$(VENV)/bin/mapex-study report

# the full evidence study (every table of the report; about an hour on 2 cores)
evidence:
	$(MAKE) demo STUDY=studies/evidence.yaml

bench: venv
	@failed=""; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || failed="$$failed $$f"; done; \
	if [ -n "$$failed" ]; then echo "targets missed:$$failed"; exit 1; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
