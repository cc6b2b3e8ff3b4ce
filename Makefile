# Two commands from a fresh clone: `make run` and `make test`. Everything else is a friend of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run demo-results readme-walk test test-fast test-image image image-gpu install system-deps bench lint duplicates clean help

help:
	@echo "make run     - install if needed, pull the embedded sample through DVC, run the whole pipeline (dvc repro)"
	@echo "make readme-walk - retake the README walk's timings and pictures on a fresh clone (needs chromium)"
	@echo "make test    - install if needed (Python packages and the test servers), run the test suite"
	@echo "make bench   - CPU benchmarks (sampler, loader, train step); GPU: benchmarks/gpu_check.sh"
	@echo "make lint    - ruff, mypy, byte-compile, and look for copy-paste twins"
	@echo "make image   - build the CPU image tasn:cpu (podman or docker; offline: bases from Debian and PyPI)"
	@echo "make image-gpu - build the CUDA image tasn:cuda on it (the fused op compiled for sm_80 and sm_90)"
	@echo "make test-image - build tasn:cpu and tasn:cuda, then run the compiled pipeline and 2-node training in them"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CUDA 13.0 build this project is tested with (never newer than 2.14.1)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# From Debian when absent: servers the integration tests start on 127.0.0.1, Ceph RGW (S3) and
# PostgreSQL (MLflow's store in the cluster); and Fashion-MNIST, the source a test re-renders the
# embedded default from (`make run` needs none of them: the dataset is in the DVC remote).
system-deps:
	@if ! command -v radosgw >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Ceph RGW (radosgw) for the S3 integration tests"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      ceph-mon ceph-osd radosgw ceph-common >/dev/null; \
	  else echo "radosgw missing and not root: S3 integration tests will be skipped"; fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing PostgreSQL for the MLflow authentication tests"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      postgresql >/dev/null; \
	  else echo "PostgreSQL missing and not root: the MLflow authentication tests will be skipped"; fi; \
	fi
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing dataset-fashion-mnist (the embedded default's source) for the data tests"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      dataset-fashion-mnist >/dev/null; \
	  else echo "Fashion-MNIST missing and not root: the re-rendering test will be skipped"; fi; \
	fi

run: install
	./scripts/run_pipeline.sh

# The committed demo run (maintainers, when the demo's numbers change): `make run`, then what it
# made into the in-repo remote dvc-storage/, where a fresh clone's `dvc pull` and `dvc artifacts
# get` find it (tests/test_local_loop.py checks), and the machine it ran on into outputs/MACHINE.md.
# Then commit dvc.lock, outputs/ and dvc-storage/.
demo-results: run
	$(BIN)/dvc push
	$(BIN)/python scripts/machine.py --results > outputs/MACHINE.md

# Retake the README's walk on a fresh clone of HEAD: each step timed, the pictures in docs/images/
# retaken through headless Chromium (Debian's chromium), a report in outputs/readme_walk.md.
readme-walk: install
	$(BIN)/python scripts/readme_walk.py

test: install system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Images (scripts/image.py; docs/cluster.md): podman, or docker where that is what the machine has;
# podman and its helpers come from Debian when absent (as root). The system python3 runs the script.
image:
	nice -n 5 $(PYTHON) scripts/image.py cpu

image-gpu:
	nice -n 5 $(PYTHON) scripts/image.py cuda

# The image tests (marker `image`; `make test` leaves them out): both images built (the CUDA one on
# the CPU one), then the compiled pipeline task by task, two-node training and the CUDA image's
# prebuilt op, in containers of the images just built, against the test servers. Where no
# container engine can run (not root, none installed), nothing is built and each test skips, saying why.
test-image: install system-deps
	nice -n 5 $(PYTHON) scripts/image.py cuda --if-possible
	$(BIN)/python -m pytest -q -p no:cacheprovider -m image

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not slow and not image"

bench: install
	$(BIN)/python benchmarks/sampler.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/train_step.py

LINTED := tasn components pipelines benchmarks tests scripts infra/crds/generate.py infra/crds/validate.py

# ruff and mypy read their settings from pyproject.toml; the tests are type-checked without
# check_untyped_defs (their bodies carry no annotations).
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy
	$(BIN)/mypy --no-check-untyped-defs tests
	$(BIN)/python -m compileall -q $(LINTED)
	-duplicates --repo . --most 20 2>/dev/null

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
