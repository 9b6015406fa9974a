# Kiln: the operator's interface. `make help` lists the targets in pipeline order.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
# This machine has a CPU build of torch 2.13.0 on disk; on a Linux GPU host the same spec from
# PyPI is the CUDA build (see README).
TORCH_SPEC ?= torch==2.13.0
MODEL ?=
TINY ?=
ARTIFACTS ?= artifacts
PRECISION ?= fp32
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PROMPT ?= a red digit 7 on a white background
PYTEST_ARGS ?=
TARGET ?= embedded
BACKEND ?= onnxruntime
IMAGE ?= kiln-triton:latest
K8S_REPOSITORY ?= s3://models/kiln/repository
GPU_CHECK_OUT ?= $(or $(OUT),$(ARTIFACTS)/gpu-check)
# empty: the venv's python after `make setup`, else the host's python3; PYTHON=... on the command line is used too
GPU_CHECK_PYTHON ?= $(if $(filter command line,$(origin PYTHON)),$(PYTHON))
GPU_CHECK_ARGS ?=
USERS ?= 4
DURATION ?= 120
UI ?=
UI_PORT ?= 7861
GATEWAY ?=
GATEWAY_PORT ?= 7860
LORAS ?=
CONTROLNET ?=

KILN := $(VENV)/bin/kiln
COMMA := ,
PORTS := --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)
STAMP := $(VENV)/.kiln-installed
# MODEL may be a diffusers folder or a single-file checkpoint (.safetensors), imported to artifacts/models/
SINGLE_FILE := $(filter %.safetensors,$(MODEL))
MODEL_DIR := $(if $(SINGLE_FILE),$(ARTIFACTS)/models/$(basename $(notdir $(MODEL))),$(if $(MODEL),$(MODEL),$(ARTIFACTS)/models/tiny))
ONNX_DIR := $(ARTIFACTS)/onnx/$(notdir $(abspath $(MODEL_DIR)))-$(PRECISION)
REPO_DIR := $(ARTIFACTS)/repository

.PHONY: help setup model export repo serve deploy deploy-k8s smoke parity eval loadtest gpu-setup gpu-check stop test test-fast clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test,embedded,train,eval,cluster,int8,gateway,ui,bench]"
	# a real browser for the web page's test (Debian's chromium); without root or apt that test skips and says why
	@if ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends chromium chromium-driver >/dev/null || \
	      { apt-get update -o DPkg::Lock::Timeout=600 -qq && apt-get install -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } || \
	      echo "chromium could not be installed: the browser test will skip"; \
	  else echo "no root apt-get: install chromium and chromium-driver for the browser test (it skips without them)"; fi; fi
	# CLIP's BPE vocabulary ships in open-clip-torch; its own dependencies (torchvision) are not wanted.
	$(VENV)/bin/pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $@

setup: $(STAMP) ## create .venv and install Kiln (TORCH_SPEC picks the torch build)

$(ARTIFACTS)/models/tiny/model_index.json: | $(STAMP)
	$(KILN) model tiny $(ARTIFACTS)/models/tiny

ifneq ($(SINGLE_FILE),)
$(MODEL_DIR)/model_index.json: $(MODEL) | $(STAMP)
	$(KILN) model import $(MODEL) $(MODEL_DIR)
endif

model: $(STAMP) $(if $(MODEL),$(if $(SINGLE_FILE),$(MODEL_DIR)/model_index.json),$(ARTIFACTS)/models/tiny/model_index.json) ## the model folder (MODEL=folder or FILE.safetensors, imported; default: the tiny model)

export: model ## export MODEL to ONNX, checked against PyTorch (PRECISION=fp32|fp16|int8)
	$(KILN) export onnx $(MODEL_DIR) $(ONNX_DIR) $(if $(filter fp16,$(PRECISION)),--fp16) $(if $(filter int8,$(PRECISION)),--int8)

repo: export ## build the Triton model repository
	$(KILN) repo build $(ONNX_DIR) $(REPO_DIR) --target embedded --backend $(BACKEND)

serve: repo ## serve the repository in the foreground (Ctrl-C stops it)
	$(KILN) serve $(REPO_DIR) $(PORTS)

ifeq ($(TARGET),k8s)
deploy: deploy-k8s ## set-up, export, repository, serve in the background, sample images (UI=1: a web page, GATEWAY=1: the A1111/OpenAI REST gateway; LORAS=1: LoRA adapters per request; CONTROLNET="canny=DIR ...": ControlNets beside MODEL; BACKEND=torch: PyTorch modules, CUDA fp16 on a GPU; BACKEND=openvino: OpenVINO on the CPU; TARGET=k8s: cluster manifests)
else
deploy: $(STAMP)
	$(KILN) deploy $(if $(MODEL),--model $(MODEL)) $(if $(TINY),--tiny) $(if $(LORAS),--lora-inputs) $(foreach c,$(CONTROLNET),--controlnet $(c)) --artifacts $(ARTIFACTS) --precision $(PRECISION) --backend $(BACKEND) $(PORTS)
	$(if $(UI),$(KILN) ui --background --url 127.0.0.1:$(HTTP_PORT) --port $(UI_PORT))
	$(if $(GATEWAY),$(KILN) gateway --background --url 127.0.0.1:$(HTTP_PORT) --port $(GATEWAY_PORT))
endif

deploy-k8s: export ## NGC repository + Kubernetes manifests (IMAGE, K8S_REPOSITORY), validated offline
	$(KILN) repo build $(ONNX_DIR) $(ARTIFACTS)/repository-ngc --target ngc --backend onnxruntime
	$(KILN) cluster render $(ARTIFACTS)/k8s --image $(IMAGE) --repository $(K8S_REPOSITORY)
	@echo "next: docker build -f deploy/Dockerfile -t $(IMAGE) . && docker push $(IMAGE)"
	@echo "      upload $(ARTIFACTS)/repository-ngc to $(K8S_REPOSITORY), then kubectl apply -k $(ARTIFACTS)/k8s"

smoke: $(STAMP) ## generate one image from the running server over HTTP and gRPC
	$(KILN) generate "$(PROMPT)" -o $(ARTIFACTS)/smoke-http.png --url 127.0.0.1:$(HTTP_PORT) --seed 0
	$(KILN) generate "$(PROMPT)" -o $(ARTIFACTS)/smoke-grpc.png --protocol grpc --url 127.0.0.1:$(GRPC_PORT) --seed 0

parity: model ## report served-vs-diffusers and ONNX-vs-PyTorch differences for MODEL
	$(VENV)/bin/python -m kiln.benchmarks.parity $(MODEL_DIR) $(ARTIFACTS)/parity

eval: $(STAMP) ## measure the glyph demo's untrained, base and merged models through Triton, against the quality bars
	$(KILN) eval --demo --artifacts $(ARTIFACTS) --out $(ARTIFACTS)/eval

loadtest: $(STAMP) ## Locust against the running server (USERS, DURATION seconds; GATEWAY=1 adds a gateway user)
	$(KILN) loadtest --users $(USERS) --spawn-rate $(USERS) --duration $(DURATION) --http-url 127.0.0.1:$(HTTP_PORT) \
		--grpc-url 127.0.0.1:$(GRPC_PORT) --metrics-url http://127.0.0.1:$(METRICS_PORT)/metrics --out $(ARTIFACTS)/loadtest \
		$(if $(GATEWAY),--protocols http$(COMMA)grpc$(COMMA)gateway --gateway-url http://127.0.0.1:$(GATEWAY_PORT))

gpu-setup: $(STAMP) ## on a CUDA host: install the `gpu` extra (TensorRT, ONNX Runtime's CUDA build in place of the CPU one)
	$(VENV)/bin/pip uninstall --quiet -y onnxruntime
	$(VENV)/bin/pip install --quiet -e ".[gpu]"

gpu-check: ## on a GPU host, no setup needed: Kiln's loop vs diffusers, full SD 1.5 (512, 50 steps) and SDXL (1024, 30 steps), fp16, batch 1 and 4, within 8 minutes; TensorRT and ORT CUDA when installed
	GPU_CHECK_PYTHON="$(GPU_CHECK_PYTHON)" bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

stop: $(STAMP) ## stop the background server (and the page or gateway in front of it)
	$(KILN) stop $(PORTS)

test: $(STAMP) ## run the test suite (starts real Triton servers on free ports)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the edit-run tier: the suite less the tests marked slow (demo training, ModelOpt, multi-process)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

clean: ## remove built artifacts (not the virtual environment)
	rm -rf $(ARTIFACTS) .pytest_cache
