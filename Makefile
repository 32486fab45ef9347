# Two entry points: `make demo` (the main job on generated demo data) and `make test`.
# `make test` lints (ruff: imports, pyflakes, a complexity ceiling) and runs the suite.
# Both create .venv on first use and install autoseg into it (torch pinned for reproducible CPU builds).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
DEMO_DIR ?= demo_data
JOBS ?= 2

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,onnx,monai,tensorboard,blosc2,dicom,explain,federated]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --data $(DEMO_DIR) -j $(JOBS)

test: $(STAMP)
	$(BIN)/ruff check autoseg tests benchmarks examples
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_DIR) autoseg_work
