# shardwire developer commands. Everything runs inside .venv, made on demand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: run test proto bench lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build, so the extras resolve against it.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[server,test,loadtest]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/shardwire --log-level warning up --model tiny --port $(PORT) --demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

proto: $(STAMP)
	$(BIN)/python -m serve.protogen

bench: $(STAMP)
	$(BIN)/shardwire bench serve --dtype bfloat16 --out bench-results/serve.json
	$(BIN)/shardwire bench serve --dtype float32 --out bench-results/serve-float32.json

lint: $(STAMP)
	$(BIN)/ruff check serve clients tests
	$(BIN)/ruff format --check serve clients tests
	$(BIN)/python -m serve.nopickle serve clients loadtests

clean:
	rm -rf $(VENV) build *.egg-info bench-results

# Load test: `shardwire up` (MODEL), locust headless (SHAPE to USERS over RUN_TIME),
# report with plots; everything lands in loadtests/results/. LOADTEST_ARGS go to locust.
MODEL ?= tiny
USERS ?= 8
SPAWN_RATE ?= 2
RUN_TIME ?= 60s
SHAPE ?= ramp
LOADTEST_ARGS ?= --slo-ttft-p95-ms 2000 --slo-error-rate 0.01

.PHONY: loadtest
loadtest: $(STAMP)
	$(BIN)/python -m loadtests.run --model $(MODEL) --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--run-time $(RUN_TIME) --shape $(SHAPE) -- $(LOADTEST_ARGS)

# Fuzzers (tests/fuzz) for FUZZ_SECONDS in all (`make test` gives them 64 s).
FUZZ_SECONDS ?= 600

.PHONY: fuzz
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q tests/fuzz -p no:cacheprovider

# Soak: mixed load at SOAK_LOAD x measured capacity for SOAK_MINUTES against
# `shardwire up`; RSS growth, KV blocks leaked, errors and TTFT drift go to
# bench-results/soak.json. SOAK_ARGS go to the driver (see `shardwire bench soak -h`).
SOAK_MINUTES ?= 30
SOAK_LOAD ?= 0.7
SOAK_ARGS ?=

.PHONY: soak
soak: $(STAMP)
	$(BIN)/python -m serve.bench.soak --model $(MODEL) --minutes $(SOAK_MINUTES) \
		--load $(SOAK_LOAD) --out bench-results/soak.json $(SOAK_ARGS)
