# fpnlib: two commands on a fresh machine.
#   make reproduce   the main job on the embedded default (PRESET=cpu)
#   make test        the test suite (unit tests + notebooks under the smoke preset)
# Every target creates the virtual environment when it is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= cpu
# torch/torchvision builds this project is tested with (they install offline on the dev machines)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.fpnlib-installed
# pytest-xdist workers for make test; each file stays on one worker (its tests share fixtures),
# files handed out in tests/conftest.py's order (slow files first), not re-sorted by test count
TEST_WORKERS ?= 2

.PHONY: help setup test reproduce bench data lab student clean-data gpu-wheels

help:
	@echo "make reproduce   run the whole reproduction under PRESET=$(PRESET)"
	@echo "make test        run the tests (unit + notebooks under smoke)"
	@echo "make bench       fpnlib beside torchvision's FasterRCNN (same configuration) -> results/bench/"
	@echo "make data        generate the embedded data set for PRESET"
	@echo "make lab         open the notebooks in JupyterLab (a run writes to scratch/, not figures/ or results/)"
	@echo "make student     write student/: the notebooks with the exercises' solutions stripped"
	@echo "make gpu-wheels  .whl/: the pycocotools wheel a lent GPU machine lacks (see .ci/gpu-session.sh)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install --quiet -e '.[notebooks,test,browser]' 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, torchvision, pycocotools, papermill, fpnlib"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

reproduce: $(STAMP)
	$(PY) -m fpnlib reproduce --preset $(PRESET)

bench: $(STAMP)
	$(PY) -m fpnlib bench

data: $(STAMP)
	$(PY) -m fpnlib data --preset $(PRESET) --root data/$(PRESET)

# as root (a container, the usual way a course image runs it) JupyterLab wants --allow-root
lab: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lab]' 2>&1 | grep -v "is ignored" || true
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

student: $(STAMP)
	$(PY) -m fpnlib student --out student

# the lent GPU machines run Python 3.12 and reach no registry: fetch the wheel here, carry .whl/ there
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl \
	  pycocotools==$$($(PY) -c "from importlib.metadata import version; print(version('pycocotools'))")

clean-data:
	rm -rf data/smoke data/cpu data/gpu
