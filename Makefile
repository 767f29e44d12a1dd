# trl-qrpo: the two commands of a first hour, and the set-up they share.
#
#   make quickstart   set up what it uses (once), then QRPO on SmolLM2-135M-Instruct with a sentiment reward: offline
#   make test         set up everything (once), then the test suite: offline, CPU
#   make setup        only the full set-up: .venv with PyTorch (CPU build), trl-qrpo, its test extras, offline assets
#
# Variables: VENV (default .venv), PYTHON (the interpreter that creates it, default python3, 3.10+),
# SETUP_OPTIONAL=0 (skip the optional vLLM and sandbox set-ups of `make setup` / `make test`),
# TORCH_INDEX_URL (see tools/setup_env.sh), QUICKSTART_ARGS (e.g. "--small", or an output folder),
# PYTEST_ARGS (e.g. PYTEST_ARGS='-m "not slow"' or PYTEST_ARGS=tests/test_docs.py).

VENV ?= $(CURDIR)/.venv
PYTHON ?= python3
# PyTorch first, pinned for the tests: a bare `torch` requirement can pull a multi-GB CUDA build. torch==2.13.0 is
# the CPU build on this project's machines (elsewhere set TORCH_INDEX_URL, see tools/setup_env.sh).
TORCH ?= torch==2.13.0
QUICKSTART_ARGS ?=
PYTEST_ARGS ?=

# Nothing in the tests or the quick start needs the Hugging Face Hub: say so, so that no library tries to reach it.
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# The venv's commands (trl, trl-qrpo, python) first on PATH, as after `source .venv/bin/activate`.
ACTIVATE = PATH="$(VENV)/bin:$$PATH" VIRTUAL_ENV="$(VENV)"

.PHONY: setup quickstart test help

help:
	@sed -n '3,5p' Makefile | sed 's/^# *//'

setup:
	@VENV="$(VENV)" PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash tools/setup_env.sh

# The quick start sets up only what it uses (tools/setup_env.sh's quickstart profile: no test or DeepSpeed extras,
# no vLLM environment); a full set-up, when done, serves it as well.
quickstart:
	@VENV="$(VENV)" PYTHON="$(PYTHON)" TORCH="$(TORCH)" SETUP_PROFILE=quickstart bash tools/setup_env.sh
	@echo "[quickstart] bash recipes/quickstart/run.sh $(QUICKSTART_ARGS)   (with $(VENV)/bin first on PATH, offline)"
	@$(ACTIVATE) $(OFFLINE) PYTHON="$(VENV)/bin/python" bash recipes/quickstart/run.sh $(QUICKSTART_ARGS)

# pytest's exit status is the recipe's: any non-zero one fails `make test`, 5 ("no tests collected") included.
# TRL_QRPO_VLLM_PYTHON: the vLLM CPU environment that the optional set-up built, when it did (see tools/setup_env.sh).
test: setup
	@vllm_python="$$(cat "$(VENV)/.trl-qrpo-vllm-python" 2>/dev/null)"; \
	if [ -n "$$vllm_python" ] && [ -z "$${TRL_QRPO_VLLM_PYTHON:-}" ]; then export TRL_QRPO_VLLM_PYTHON="$$vllm_python"; fi; \
	$(ACTIVATE) $(OFFLINE) "$(VENV)/bin/python" -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status = 5 ]; then echo "make test: pytest collected no tests (exit status 5): a failure" >&2; fi; \
	exit $$status
