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
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test,bench,lint,vertex]'
	@touch $@

venv: $(STAMP)

$(BIGQUERY_EMULATOR): tests/install_bigquery_emulator.sh
	bash tests/install_bigquery_emulator.sh $(BIGQUERY_EMULATOR_VENV)
	@touch $@

# The demo, from a clean slate (the broker keeps its data in memory; the demo's warehouse is rebuilt):
# the local broker, 50 simulated days of card transactions of 1,000 customers (with their labels, 7 days
# later), ingested into the embedded warehouse, and a model trained on the latest labelled weeks,
# evaluated, published to the model store (.kbml/models) and promoted if it beats the current one. Then
# the scorer runs on live traffic (3 more days at 1,000 events/s): it rebuilds the customers' and terminals'
# histories from the topics, scores each new transaction and writes its prediction to Kafka, while
# `kbml watch` shows predictions/s, the model version and the alerts.
DEMO_CUSTOMERS ?= 1000
DEMO_DAYS ?= 50
DEMO_LIVE = --customers $(DEMO_CUSTOMERS) --terminals $$((2 * $(DEMO_CUSTOMERS))) --days 3 --seed 1 \
	--start-date $$(date -u -d '2018-04-01 + $(DEMO_DAYS) days' +%F) --first-transaction-id 100000000 --rate 1000

demo: $(STAMP)
	$(BIN)/kbml local down
	rm -f .kbml/warehouse.duckdb
	$(BIN)/kbml local up
	$(BIN)/kbml simulate --customers $(DEMO_CUSTOMERS) --terminals $$((2 * $(DEMO_CUSTOMERS))) --days $(DEMO_DAYS)
	$(BIN)/kbml ingest --stop_at_end
	$(BIN)/kbml warehouse summary
	$(BIN)/kbml train --last-days 7
	$(BIN)/kbml score > .kbml/scorer.log 2>&1 & echo $$! > .kbml/scorer.pid
	sleep 15
	$(BIN)/kbml simulate $(DEMO_LIVE) > .kbml/live-simulation.log 2>&1 &
	$(BIN)/kbml watch --seconds 75 --interval 5
	kill $$(cat .kbml/scorer.pid)
	$(BIN)/kbml local status

# tests/test_report.py renders `kbml report` with headless Chromium: Debian's package (CI runs as root).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

test: $(STAMP) $(BIGQUERY_EMULATOR) $(CHROMIUM)
	KBML_BIGQUERY_EMULATOR_VENV=$(abspath $(BIGQUERY_EMULATOR_VENV)) $(BIN)/python -m pytest

# bench.trainer simulates and ingests the standard run (3.6 million events) first: about 12 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python -m bench.kafka_clients
	$(BIN)/python -m bench.kafka_io
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.scoring
	$(BIN)/python -m bench.trainer

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	-$(BIN)/kbml local down
	rm -rf $(VENV) $(BIGQUERY_EMULATOR_VENV) .kbml *.egg-info
