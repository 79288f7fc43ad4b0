# RecSetters. Two commands do all set-up on a fresh machine: `make train` and `make test`.
PY      := .venv/bin/python
DATASET ?= demo
TEXT    ?= lyrics
EPOCHS  ?=
SEED    ?= 0
ARGS    ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv train test bench clean

venv: .venv/.installed
.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

train: venv
	$(PY) recsetters.py train --dataset $(DATASET) --text $(TEXT) --seed $(SEED) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf runs data/demo
