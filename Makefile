# The two commands a newcomer needs: `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PG_BIN ?= /usr/lib/postgresql/15/bin
RABBIT := /usr/lib/rabbitmq/bin/rabbitmq-server
PYTEST_ARGS ?=

.PHONY: help install system-deps lint test unit demo bench bench-quick bench-shapes bench-recovery \
	bench-scale bench-consumer clean

help:
	@echo "make demo   - start a sandbox PostgreSQL + RabbitMQ, run the relay, show events flowing"
	@echo "make test   - install what is missing, lint (ruff, mypy --strict), run every test"
	@echo "make lint   - ruff + mypy only"
	@echo "make unit   - unit tests only (no servers)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "cdc-relay needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# PostgreSQL 15, RabbitMQ and Prometheus (server and promtool, for the alert-rule tests) come
# from the distribution's packages when absent; --no-install-recommends keeps exporters out.
system-deps:
	@if [ ! -x $(PG_BIN)/postgres ] || [ ! -x $(RABBIT) ]; then \
		echo "installing PostgreSQL 15 / RabbitMQ with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			$$([ -x $(PG_BIN)/postgres ] || echo postgresql-15) \
			$$([ -x $(RABBIT) ] || echo rabbitmq-server) >/dev/null; \
	fi
	@if [ ! -x /usr/bin/promtool ] || [ ! -x /usr/bin/prometheus ]; then \
		echo "installing Prometheus with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null; \
	fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test: install system-deps lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: install system-deps
	$(PY) -m tests.demo

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run

bench-quick: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run --quick

bench-shapes: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run --quick --only shapes

bench-recovery: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run --only recovery

bench-scale: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run --only scale

bench-consumer: $(VENV)/.bench system-deps
	$(PY) -m benchmarks.run --only consumer

clean:
	-$(PY) -m tests.sandbox down --dir .sandbox
	rm -rf .sandbox
