# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell tools/find_python.sh)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

# The stamp depends on what declares the dependencies, so a second run reuses .venv in seconds.
$(STAMP): setup.py constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; pass PYTHON=/path/to/python3.12" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m megaprolong.demo

test: $(STAMP)
	@tools/setup_test_env.sh $(PY)
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) .pytest_cache runs .cache
