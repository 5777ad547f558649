# Two entry points that work on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install tools serve serve-assets test lint bench audit soak gpu-check reliability-report mutation

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Tools the deployment checks use (promtool, Prometheus, docker-compose, check-jsonschema, kubernetes-validate,
## hadolint): installed when missing; a test whose tool is still missing skips and names it.
tools: $(STAMP)
	bash docker/ci-tools.sh $(VENV)

## How `make serve` runs passes (docs/backends.md): on a CPU, OpenVINO fp32 graphs, one per keep-rate bucket
## (cached in ~/.cache/evit-serve/graphs); eager fp16 torch on CUDA. Eager fp32, any exact keep rate:
## make serve BACKEND_ARGS="--backend torch"; bf16 (faster, outside the accuracy bounds): BACKEND_ARGS="--backend auto --precision auto"
BACKEND_ARGS ?= --backend auto

## Serve the default model (DeiT-S, timm hub weights) on 127.0.0.1:8000.
serve: $(STAMP)
	$(VENV)/bin/evit-serve $(BACKEND_ARGS) $(SERVE_ARGS)

## Serve the real ViT-Ti weights from ../shared/assets (works offline).
serve-assets: $(STAMP)
	$(VENV)/bin/evit-serve --model vit_tiny_patch16_224 \
	  --checkpoint ../shared/assets/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \
	  $(BACKEND_ARGS) $(SERVE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## The whole test suite (what .ci/run runs), then the dependency audit.
test: lint tools
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) .ci/audit.py

## pip-audit over the installed dependencies: fails on a known vulnerability with a fix available
## (offline: a loud warning; in CI, i.e. with CI or EVIT_AUDIT_STRICT=1 set, a failure).
audit: $(STAMP)
	$(PY) .ci/audit.py

## The reliability, fuzz and security checks, then (only if every one passed) their measured figures written to
## docs/reliability.json and the figures section of docs/reliability.md. `make test` writes neither.
## (every test file that records a row: grep -l 'record("' tests/test_*.py, but the soak's)
RELIABILITY_TESTS ?= tests/test_reliability_corpus.py tests/test_reliability_faults.py tests/test_reliability_live.py \
	tests/test_reliability_signals.py tests/test_reliability_background.py tests/test_reliability_decode_deadline.py \
	tests/test_reliability_resize.py tests/test_fuzz_api.py tests/test_fuzz_decode.py tests/test_fuzz_v2.py \
	tests/test_security_auth.py
reliability-report: $(STAMP)
	EVIT_RELIABILITY_REPORT=1 $(PY) -m pytest $(RELIABILITY_TESTS) $(PYTEST_ARGS)

## Mutation score (not in the default run): mutmut over the modules and tests in pyproject's [tool.mutmut],
## bounded by MUTATION_TIMEOUT seconds; MUTANTS narrows it (e.g. MUTANTS='service.auth*'). Survivors: `mutmut results`.
MUTANTS ?=
MUTATION_TIMEOUT ?= 1800
mutation: $(STAMP)
	PYTHONPATH=. timeout $(MUTATION_TIMEOUT) $(VENV)/bin/mutmut run $(MUTANTS) || test $$? = 124
	$(VENV)/bin/mutmut results

## The soak test (not in the default run): EVIT_SOAK_REQUESTS requests (default 20000); figures in docs/reliability.md.
soak: $(STAMP)
	EVIT_RELIABILITY_REPORT=1 $(PY) -m pytest -m soak tests/test_soak.py $(PYTEST_ARGS)

## The README's throughput table: one thread, this process's CPU time (steady on a shared CPU), median of 7
## interleaved rounds. Its wall-clock line: make bench BENCH_CLOCK="--threads 0 --clock wall".
BENCH_CLOCK ?= --threads 1 --clock cpu
bench: $(STAMP)
	mkdir -p out
	$(PY) -m evit.tools.bench --model deit_small_patch16_224 --batch-size 16 --keep-rates 1.0,0.9,0.7,0.5 \
	  --rounds 7 $(BENCH_CLOCK) --out out/bench-results.json

## Every CUDA test and the GPU benchmarks in one call (< 8 min on one GPU), printing the ratios; on a machine
## without a GPU the tests skip and say why.
gpu-check: $(STAMP)
	timeout 480 $(PY) -m pytest -m cuda -p no:randomly -q -rs $(PYTEST_ARGS)
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  for p in fp32 fp16; do timeout 120 $(PY) -m evit.tools.bench --device cuda --backend torch --precision $$p \
	    --model deit_small_patch16_224 --batch-size 64 --rounds 5 --out /tmp/evit-gpu-torch-$$p.json || exit 1; done; \
	  timeout 150 $(PY) -m evit.tools.bench --device cuda --backend onnxruntime --precision fp16 \
	    --model deit_small_patch16_224 --batch-size 64 --rounds 5 --out /tmp/evit-gpu-ort-fp16.json; \
	else echo "gpu-check: no CUDA device here: GPU benchmarks skipped"; fi
