# Set-up and workflow targets. `make test` and `make workflow` install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= profiles/cpu.yml

.PHONY: install test shapes coord lr workflow clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -c "import torch, transformers, mup; print('installed torch', torch.__version__, 'transformers', transformers.__version__, 'mup', mup.__name__)"
	touch $@

test: install
	$(PY) -m pytest -q tests

shapes: install
	$(PY) create_base_shapes.py --config $(CONFIG)

coord: shapes
	$(PY) coord_check.py --config $(CONFIG)

lr: shapes
	$(PY) lr_check.py --config $(CONFIG)

workflow: shapes coord lr

clean:
	rm -rf $(VENV) results base_shapes.bsh
