#!/usr/bin/env bash
# Installs the BigQuery emulator (local-bigquery) for the tests, in its own virtual environment: it needs
# Python 3.13, the project runs on 3.11. Idempotent. Usage: tests/install_bigquery_emulator.sh VENV_DIR
# The DuckDB extensions it needs come in PyPI wheels; DuckDB installs them under $HOME/.duckdb, so HOME is
# pointed at VENV_DIR/duckdb-home here and when the emulator runs (tests/bigquery_emulator.py).
set -euo pipefail

venv="${1:?usage: $0 VENV_DIR}"
python313="${PYTHON313:-}"
if [ -z "$python313" ]; then
  if command -v pyenv >/dev/null && [ -x "$(pyenv root)/versions/3.13.0/bin/python3.13" ]; then
    python313="$(pyenv root)/versions/3.13.0/bin/python3.13"
  else
    python313="$(command -v python3.13 || true)"
  fi
fi
if [ -z "$python313" ]; then
  echo "The BigQuery emulator needs Python 3.13: install it (pyenv install 3.13.0) or set PYTHON313." >&2
  exit 1
fi

[ -x "$venv/bin/python" ] || "$python313" -m venv "$venv"
# local-bigquery 0.3.2 and the DuckDB build whose extensions ship on PyPI: the set that installs offline.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  local-bigquery==0.3.2 duckdb==1.5.5 duckdb-extension-ducklake==1.5.5 duckdb-extension-icu==1.5.5 \
  duckdb-extension-spatial==1.5.5 duckdb-extension-avro==1.5.5 2>&1 | { grep -v 'is ignored: it is neither' || true; }

mkdir -p "$venv/duckdb-home"
HOME="$venv/duckdb-home" "$venv/bin/python" - <<'PY'
import glob, os, sysconfig, duckdb
files = glob.glob(os.path.join(sysconfig.get_paths()['purelib'], '**', '*.duckdb_extension'), recursive=True)
if not files:
    raise SystemExit('no DuckDB extension files found in the duckdb-extension-* wheels')
connection = duckdb.connect()
for path in sorted(files):
    connection.execute(f"INSTALL '{path}'")
    connection.execute(f"LOAD {os.path.basename(path).split('.')[0]}")
PY
echo "BigQuery emulator installed: $venv/bin/local-bigquery"
