# Two entry points, each setting everything up first:
#   make demo DATA=../shared/data   train, export with BN folded, predict on sample PNGs
#   make test DATA=../shared/data   the whole test suite
DATA ?= $(or $(BNPIPE_DATA),data)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/bnpipe train --data $(DATA)
	$(BIN)/bnpipe export --fold-bn --data $(DATA)
	$(BIN)/bnpipe samples --data $(DATA) -n 20
	$(BIN)/bnpipe predict models/samples

test: setup
	BNPIPE_DATA=$(abspath $(DATA)) $(BIN)/python -m pytest
