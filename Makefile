# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The BigQuery emulator the tests use needs Python 3.13: it gets its own environment.
BIGQUERY_EMULATOR_VENV ?= .venv-bigquery
BIGQUERY_EMULATOR := $(BIGQUERY_EMULATOR_VENV)/bin/local-bigquery

.PHONY: venv demo test bench lint clean

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "kafka-beam-ml needs Python 3.11; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test,bench,lint]'
	@touch $@

venv: $(STAMP)

$(BIGQUERY_EMULATOR): tests/install_bigquery_emulator.sh
	bash tests/install_bigquery_emulator.sh $(BIGQUERY_EMULATOR_VENV)
	@touch $@

# The demo: the local broker, three simulated days of card transactions (with their labels, 7 days
# later), ingested into the embedded warehouse.
DEMO_DAYS ?= 3

demo: $(STAMP)
	$(BIN)/kbml local up
	$(BIN)/kbml simulate --days $(DEMO_DAYS)
	$(BIN)/kbml ingest --stop_at_end
	$(BIN)/kbml warehouse summary
	$(BIN)/kbml local status

test: $(STAMP) $(BIGQUERY_EMULATOR)
	KBML_BIGQUERY_EMULATOR_VENV=$(abspath $(BIGQUERY_EMULATOR_VENV)) $(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.kafka_clients
	$(BIN)/python -m bench.kafka_io
	$(BIN)/python -m bench.features

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	-$(BIN)/kbml local down
	rm -rf $(VENV) $(BIGQUERY_EMULATOR_VENV) .kbml *.egg-info
