# flux2lora: two set-up commands on a fresh machine — `make demo` and `make test` (see README).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# The demo and the tests run fully offline on a tiny random model built here.
OFFLINE := HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 PREFECT_HOME=$(CURDIR)/.prefect PATH=$(CURDIR)/$(BIN):$$PATH

.PHONY: install demo test services services-status services-down services-note clean-demo

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# constraints.txt pins torch to the release we test with and keeps dvc[s3]/boto3 from backtracking
	$(BIN)/pip install -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

models/tiny-klein-4b/model_index.json: | $(BIN)/.installed
	$(OFFLINE) $(BIN)/flux2lora make-tiny-model models/tiny-klein-4b --flavour klein-4b --seed 0

data/demo/shape_000.png: | $(BIN)/.installed
	$(OFFLINE) $(BIN)/flux2lora demo-data data/demo --count 8

# Builds the tiny klein-4b and a generated dataset, then runs all six stages through the Prefect flow
# (a temporary local Prefect server is started for it). A second `make demo` redoes nothing: dvc.lock is the truth.
# The temporary server gets 120 s to start (Prefect's default, 20 s, ran out on a 2-core machine under load).
demo: install models/tiny-klein-4b/model_index.json data/demo/shape_000.png
	$(OFFLINE) PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 $(BIN)/python -m flows.train
	@echo
	@echo "LoRA:       $(CURDIR)/outputs/lora/pytorch_lora_weights.safetensors"
	@echo "Published:  $(CURDIR)/outputs/publish/ (model card, samples)"
	@echo "MLflow UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --workers 1   then open http://127.0.0.1:5000"

# One pytest worker more than there are cores (tests/conftest.py: the end-to-end tests wait a lot), at most 4 (each
# starts servers and subprocesses of its own); a test file stays on one worker, so its module fixtures (a trained
# project, a Prefect server) are built once, and the three Ray files go to one worker together, which starts one
# Ray cluster for them (conftest SHARED_BY). Files are handed out in collection order, longest first (conftest
# LONGEST_FIRST), not xdist's default by test count, which ran the few-test, minutes-long files (Ray, DDP) last,
# one worker idling beside them.
test: install
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile \
		--no-loadscope-reorder --durations=40

# A local Prefect server (:4200), process worker and MLflow server (:5000) in the background, on loopback; pids,
# ports and logs in .services/. Prints the URLs and `export PREFECT_API_URL=... MLFLOW_TRACKING_URI=...`.
# ARGS passes flags through: make services ARGS="--only mlflow --mlflow-port 0"
ARGS ?=
services: install
	PATH=$(CURDIR)/$(BIN):$$PATH DVC_NO_ANALYTICS=1 $(BIN)/flux2lora services up $(ARGS)

services-status:
	$(BIN)/flux2lora services status $(ARGS)

services-down:
	$(BIN)/flux2lora services down $(ARGS)

clean-demo:
	rm -rf outputs models data/demo mlflow.db mlartifacts dvc.lock .prefect
