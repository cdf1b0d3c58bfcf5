# Everything installs into .venv. On these machines torch==2.14.1 / torchvision==0.29.1 come from local disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[learn,export,agent,backbones,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mae-ad demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mae_ad trt agent app tests
	$(VENV)/bin/mypy agent trt app mae_ad/config.py mae_ad/contract.py

bench: $(STAMP)
	$(VENV)/bin/mae-ad bench all --out bench_out/bench.json

clean:
	rm -rf demo_out bench_out .pytest_cache
