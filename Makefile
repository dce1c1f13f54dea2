# Run order of the numbered scripts (7 writes the report, so it runs last). `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
SMOKE_DIR ?= results/smoke

# The embedded default needs no network; set HF_HUB_OFFLINE=0 to use hub models or datasets.
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE
export HF_DATASETS_OFFLINE := $(HF_HUB_OFFLINE)
export TOKENIZERS_PARALLELISM := false

# The run order comes from the one stage table (common/stages.py; plain Python, no dependencies).
STAGES := $(shell $(PYTHON) common/stages.py)

.PHONY: help install pipeline smoke test test-fast ablation benchmark sensitivity benchmark-alignment benchmark-latency-table benchmark-vocabulary sweep compress compress-summary retention-check stages clean-smoke gpu-check

help:
	@echo "make pipeline   install if needed, then run every stage on the embedded default (ARGS='--field value' passes overrides)"
	@echo "make test       install if needed, then run the test suite (17–42 minutes on 2 cores)"
	@echo "make test-fast  the suite without the end-to-end subprocess runs (marked slow): every module, a few minutes"
	@echo "make smoke      every stage on the smoke profile, into $(SMOKE_DIR)/"
	@echo "make ablation   KGSP / MSP / QKD ablation over 3 seeds -> results/ablation.{json,png,md}"
	@echo "make benchmark  student vs pruned size and latency, l2 vs l2+kd_grad step time"
	@echo "make sweep      stage 8 + int8 at 5 sparsities x 3 seeds -> results/sweep.{json,png,md}"
	@echo "make compress   stages 8, 10, 12, 13 toward ARGS='--target_retention 0.99 --optimize latency' -> results/compress/"
	@echo "make compress-summary  test accuracy of what every compress run delivered, and its spread over runs -> results/compress_summary.md"
	@echo "make retention-check  ARGS='--models PATH ...': validation and test accuracy, retention, disagreements and the gate of any models against the teacher -> results/retention_check.md"
	@echo "make sensitivity  per-layer accuracy drop of pruning heads / FFN neurons -> results/sensitivity.{json,png}"
	@echo "make benchmark-alignment  latency of aligned vs unaligned FFN widths -> results/alignment_benchmark.json"
	@echo "make benchmark-latency-table  the per-machine latency table of layer shapes against every pruned checkpoint -> results/latency_table_check.json"
	@echo "make benchmark-vocabulary  what dropping tokens rare in training costs and saves on the newest pruned checkpoint -> results/vocabulary_benchmark.json"
	@echo "make gpu-check  on a machine with a GPU: every stage (smoke profile) on CUDA, the report's GPU rows and tests/test_gpu.py, within 8 minutes; without one it says so and runs nothing"
	@echo "make stages     the stage table: each stage's script, inputs and what it writes"
	@echo "run order: $(STAGES)"

$(STAMP): requirements.txt requirements-embedded.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-embedded.txt
	touch $(STAMP)

install: $(STAMP)

pipeline: install
	@set -e; for stage in $(STAGES); do \
		echo "==> $$stage"; start=$$(date +%s); \
		$(PY) $$stage $(ARGS); \
		echo "==> $$stage finished in $$(( $$(date +%s) - start )) s"; \
	done

smoke: install
	@set -e; for stage in $(STAGES); do \
		echo "==> $$stage (smoke)"; \
		COMPRESSION_RESULTS_DIR=$(SMOKE_DIR) $(PY) $$stage --profile smoke $(ARGS); \
	done

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

ablation: install
	$(PY) scripts/ablation.py $(ARGS)

benchmark: install
	$(PY) scripts/benchmark_pruning.py $(ARGS)

sweep: install
	$(PY) scripts/sweep.py $(ARGS)

compress: install
	$(PY) scripts/compress.py $(ARGS)

compress-summary: install
	$(PY) scripts/compress_summary.py $(ARGS)

retention-check: install
	$(PY) scripts/retention_check.py $(ARGS)

sensitivity: install
	$(PY) scripts/sensitivity.py $(ARGS)

benchmark-alignment: install
	$(PY) scripts/benchmark_alignment.py $(ARGS)

benchmark-latency-table: install
	$(PY) scripts/benchmark_latency_table.py $(ARGS)

benchmark-vocabulary: install
	$(PY) scripts/benchmark_vocabulary.py $(ARGS)

gpu-check: install
	$(PY) scripts/gpu_check.py $(ARGS)

stages:
	@$(PYTHON) common/stages.py --table

clean-smoke:
	rm -rf $(SMOKE_DIR)
