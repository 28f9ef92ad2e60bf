# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The BigQuery emulator the tests use needs Python 3.13: it gets its own environment.
BIGQUERY_EMULATOR_VENV ?= .venv-bigquery
BIGQUERY_EMULATOR := $(BIGQUERY_EMULATOR_VENV)/bin/local-bigquery
# Apache Kafka's jars and their dependencies, from Maven Central (kbml/broker/apache-kafka.pom.xml); the local
# stack runs the broker from them (kbml/local_stack.py).
KAFKA_LIBS := .cache/apache-kafka/libs

.PHONY: venv kafka demo test bench lint clean

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "kafka-beam-ml needs Python 3.11; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[test,bench,lint,vertex]'
	@touch $@

venv: $(STAMP)

kafka: $(KAFKA_LIBS)/.complete

$(KAFKA_LIBS)/.complete: kbml/broker/apache-kafka.pom.xml
	command -v java >/dev/null && command -v mvn >/dev/null || \
	  { apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven; }
	rm -rf $(KAFKA_LIBS)
	mvn --quiet --batch-mode -f $< dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(KAFKA_LIBS))
	touch $@

$(BIGQUERY_EMULATOR): tests/install_bigquery_emulator.sh
	bash tests/install_bigquery_emulator.sh $(BIGQUERY_EMULATOR_VENV)
	@touch $@

# The demo, from a clean slate (the broker's topics, the demo's warehouse and model store are rebuilt): the
# whole loop of `kbml loop` on a simulated population of 500 cards, on the local Apache Kafka (`make kafka` fetches
# its jars; KBML_BROKER=tansu for the in-memory broker). 82 days of history are ingested and a first
# model is trained; then the scorer, the monitor, a streaming ingest and `kbml retrain --on-drift` run as their
# own processes while more days are produced live, with a cash-out wave from day 85.
# The monitor reports the drift, the retrain waits for the wave's labelled days, trains and promotes a new
# model, and the scorer takes it live; the traffic goes on until the labels of 3 whole days the new model scored
# are in. Then `kbml status` and `kbml report` (the path of the HTML page).
# USE_CASE=iot runs the IoT loop instead: 60 machines whose seals start to leak on day 33 (about 7 minutes).
USE_CASE ?= fraud
demo: $(STAMP) $(KAFKA_LIBS)/.complete
	$(BIN)/kbml local down
	rm -rf .kbml/kafka-logs .kbml/snapshots .kbml/warehouse.duckdb .kbml/models .kbml/loop
	$(BIN)/kbml local up --use-case $(USE_CASE)
	$(BIN)/kbml loop --use-case $(USE_CASE)
	$(BIN)/kbml status --sample-s 0
	$(BIN)/kbml report

# tests/test_report.py renders `kbml report` with headless Chromium: Debian's package (CI runs as root).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

test: $(STAMP) $(KAFKA_LIBS)/.complete $(BIGQUERY_EMULATOR) $(CHROMIUM)
	KBML_BIGQUERY_EMULATOR_VENV=$(abspath $(BIGQUERY_EMULATOR_VENV)) $(BIN)/python -m pytest

# bench.trainer simulates (the handbook's own draws) and ingests the standard run (3.5 million events) first: about
# 10 minutes on 2 cores.
# bench.soak runs every long-running pipeline idle for 10 minutes, then at 1,000 events/s: about 35 minutes.
# bench.restart restarts scorers after 30 and 150 days of history: about 10 minutes; bench.long_stream scores the
# standard run (183 days) in one streaming scorer: about 15 minutes.
bench: $(STAMP) $(KAFKA_LIBS)/.complete
	$(BIN)/python -m bench.brokers
	$(BIN)/python -m bench.kafka_clients
	$(BIN)/python -m bench.kafka_io
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.scoring
	$(BIN)/python -m bench.trainer
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.restart
	$(BIN)/python -m bench.long_stream

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	-$(BIN)/kbml local down
	rm -rf $(VENV) $(BIGQUERY_EMULATOR_VENV) .kbml .cache *.egg-info
