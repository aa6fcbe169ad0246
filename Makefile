# Two commands matter (see README): `make demo` and `make test`. Everything they need, they install.
PYTHON ?= python3
PIP := $(PYTHON) -m pip --disable-pip-version-check --quiet

.PHONY: install demo test-deps lint test bench

install:
	$(PIP) install -e '.[local]'
	$(PYTHON) -m scalebox_kernel runtimes install --best-effort
	$(PYTHON) -m scalebox_kernel install --sys-prefix

demo: install
	$(PYTHON) -m scalebox_kernel demo

test-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)
	$(PIP) install -e '.[test]'
	$(PYTHON) -m scalebox_kernel runtimes install

lint: test-deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test: lint
	$(PYTHON) -m pytest -q -ra --durations=15

bench: test-deps
	for b in bench/bench_*.py; do $(PYTHON) -m bench.$$(basename $$b .py) || exit 1; done
