# Everything a fresh clone needs: `make run`, `make test`, `make bench`, `make proto`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint types pytest bench proto clean

$(STAMP): pyproject.toml asgi_pprof/_memsample.c asgi_pprof/_wire.c asgi_pprof/_tracestep.c asgi_pprof/_traces.c asgi_pprof/_stacks.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@echo "pprof at http://127.0.0.1:8000/debug/pprof/ -- try, in another shell:"
	@echo "  go tool pprof -top 'http://127.0.0.1:8000/debug/pprof/profile?seconds=5'"
	# asyncio, not uvloop: /trace shows loop steps only on asyncio's own loop.
	$(PY) -m uvicorn examples.service:app --host 127.0.0.1 --port 8000 --loop asyncio

lint: $(STAMP)
	$(PY) -m ruff format --check asgi_pprof tests examples bench
	$(PY) -m ruff check asgi_pprof tests examples bench

types: $(STAMP)
	$(PY) -m mypy asgi_pprof

pytest: $(STAMP)
	$(PY) -m pytest --cov=asgi_pprof --cov-report=term --cov-fail-under=90 $(PYTEST_ARGS)

test: lint types pytest

bench: $(STAMP)
	$(PY) bench/run.py

# Regenerate the protobuf module from the vendored profile.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iasgi_pprof/proto --python_out=asgi_pprof/proto \
		--pyi_out=asgi_pprof/proto asgi_pprof/proto/profile.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
