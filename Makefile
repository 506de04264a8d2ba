# Set-up and workflow targets. `make test` and `make workflow` install into .venv first.
# `make build` and `make run` build the CUDA image (Dockerfile) and start Jupyter Lab in it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= profiles/cpu.yml
# Where trials run. Two 1-thread worker processes use both cores of a 2-core CPU; on a GPU
# use `EXECUTOR=` (one trial at a time) or `EXECUTOR="--executor ray --gpus-per-trial 0.25"`.
EXECUTOR ?= --executor processes --workers 2

# Docker settings. BASE_IMAGE, when set, replaces the Dockerfile's PyTorch CUDA image.
DOCKER ?= docker
IMAGE ?= mup-qwen:latest
BASE_IMAGE ?=
# Host address and port that Jupyter Lab is published on: loopback only by default.
JUPYTER_HOST ?= 127.0.0.1
JUPYTER_PORT ?= 8888
# Shared memory for the container: Ray keeps its object store there.
SHM_SIZE ?= 8g

.PHONY: install test shapes coord lr workflow clean build run

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -c "import importlib.metadata as m, torch, transformers, mup; print('installed torch', torch.__version__, 'transformers', transformers.__version__, 'mup', m.version('mup'))"
	touch $@

test: install
	$(PY) -m pytest -q tests

shapes: install
	$(PY) create_base_shapes.py --config $(CONFIG)

coord: shapes
	$(PY) coord_check.py --config $(CONFIG) $(EXECUTOR)

lr: shapes
	$(PY) lr_check.py --config $(CONFIG) $(EXECUTOR)

workflow: shapes coord lr

clean:
	rm -rf $(VENV) results base_shapes.bsh

build:
	$(DOCKER) build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) -t $(IMAGE) .

# Jupyter Lab with every GPU and the repository mounted, as the host user. The token is
# JUPYTER_TOKEN, or a new random one when that is unset or empty. It reaches the container
# through the environment, not the command line.
run:
	@$(DOCKER) image inspect $(IMAGE) > /dev/null 2>&1 || { echo "image $(IMAGE) not found. Run make build first." >&2; exit 2; }
	@token="$${JUPYTER_TOKEN:-$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))')}"; \
	test -n "$$token" || { echo "failed to generate a Jupyter token. Set JUPYTER_TOKEN." >&2; exit 2; }; \
	echo "Jupyter Lab: http://$(JUPYTER_HOST):$(JUPYTER_PORT)/lab?token=$$token"; \
	JUPYTER_TOKEN="$$token" $(DOCKER) run --rm $$(test -t 0 && echo --interactive --tty) --gpus all \
		--shm-size=$(SHM_SIZE) --user "$$(id -u):$$(id -g)" --env JUPYTER_TOKEN \
		--publish $(JUPYTER_HOST):$(JUPYTER_PORT):8888 --volume "$(CURDIR)":/workspace --workdir /workspace \
		$(IMAGE)
