# The two commands of the README: `make run` runs the pipeline, `make test` passes the tests.
# Both bootstrap uv if it is missing, install the locked environment, then act.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else a private copy installed from PyPI into .tools/ (no system changes).
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
RUN := $(UV) run --frozen --no-sync
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: help run stop-server test test-fast lint format bench sync ensure-data ensure-mpi

help:
	@echo "make run    run the whole pipeline (ARGS='--epochs 1 ...' passes options; see 'pipeline run --help')"
	@echo "            and record it in a local Prefect server kept running (UI: http://127.0.0.1:4200)"
	@echo "make stop-server  stop that Prefect server"
	@echo "make test   lint and run the whole test suite (real servers, signals, containers, the cluster: what CI runs)"
	@echo "make test-fast  lint and run the fast tier: pure cores and single-process tests (<= 2 min; see tests/README.md)"
	@echo "make bench  run the benchmarks under bench/"

$(CURDIR)/.tools/bin/uv:
	@echo "uv not found on PATH: installing it from PyPI into .tools/"
	python3 -m venv .tools && .tools/bin/pip install --quiet uv

# Horovod is compiled against Open MPI: a host's ranks exchange over its shared memory
# (tasks/train/mpirun.py). Install Debian's packages when they are missing and we are root.
OPENMPI_PACKAGES := libopenmpi-dev openmpi-bin
ensure-mpi:
	@if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Open MPI ($(OPENMPI_PACKAGES)): Horovod is built against it"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(OPENMPI_PACKAGES); \
	  else \
	    echo "make: Open MPI is missing; install $(OPENMPI_PACKAGES) (as root), then run make again" >&2; \
	    exit 1; \
	  fi; \
	fi

sync: ensure-mpi | $(UV)
	@$(UV) sync --frozen

# Where no mirror is reachable the dataset step falls back to Debian's dataset-fashion-mnist
# package; install it when nothing is cached yet and we are root on a Debian/Ubuntu system.
ensure-data: sync
	@if ! $(RUN) pipeline dataset --offline >/dev/null 2>&1 \
	    && [ ! -e $(DEBIAN_DATA)/train-images-idx3-ubyte.gz ] \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: no cached Fashion-MNIST: installing Debian's dataset-fashion-mnist (offline fallback mirror)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

# --local-server: the run is recorded in a Prefect server that stays up between runs (started
# on the first run; `make stop-server` ends it). With PREFECT_API_URL set, that server is used.
run: ensure-data
	$(RUN) pipeline run --local-server $(ARGS)

stop-server: sync
	$(RUN) pipeline server stop

lint: sync
	$(RUN) ruff check .
	$(RUN) ruff format --check .

test: lint
	$(RUN) pytest $(ARGS)

# The fast tier: every test not marked `integration` (tests/conftest.py marks the ones that use
# a real server; tests/README.md says what else is in the full tier only).
test-fast: lint
	$(RUN) pytest -m "not integration" $(ARGS)

format: sync
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

bench: sync
	$(RUN) python -m bench.dataset_speed
	$(RUN) python -m bench.train_speed
	$(RUN) python -m bench.exchange
	$(RUN) python -m bench.pipeline_overhead
	$(RUN) python -m bench.s3_throughput
