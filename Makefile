# The two set-up-free commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
STAMP_DEV = $(VENV)/.installed-dev

.PHONY: demo test bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/thpcow compare

test: $(STAMP_DEV)
	$(PY) -m pytest -n 2 -q

# docs/results.md and docs/results/*.png from the built-in scenarios (a real Redis needs the dev extras).
results: $(STAMP_DEV)
	$(VENV)/bin/thpcow results

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
