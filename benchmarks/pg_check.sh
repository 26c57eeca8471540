#!/usr/bin/env bash
# Run the store's catalog tests against a throwaway local PostgreSQL as well as SQLite.
#
#   benchmarks/pg_check.sh          start (or reuse) the server, run tests/test_store.py on both backends
#   benchmarks/pg_check.sh stop     stop the server (the data directory stays in $PGROOT)
#
# What it does, step by step (Debian/Ubuntu; PostgreSQL 15 here, any >= 12 should do):
#   1. apt-get install -y postgresql                         (server binaries; the packaged cluster is not used)
#   2. initdb a cluster in $PGROOT/data, start it on localhost:$PGPORT (TCP, trust auth: local testing only)
#   3. CREATE USER wisemem PASSWORD 'wisemem'; CREATE DATABASE wisemem OWNER wisemem
#   4. .venv/bin/pip install "psycopg[binary]"               (the SQLAlchemy driver: postgresql+psycopg://)
#   5. WISEMEM_TEST_PG_URL=postgresql+psycopg://wisemem:wisemem@localhost:$PGPORT/wisemem pytest tests/test_store.py
#      Every test taking the `store`/`catalog_url` fixture runs on sqlite and on postgresql; each PostgreSQL
#      test creates its own schema (URL parameter options=-csearch_path=<schema>) and drops it afterwards.
#      Without WISEMEM_TEST_PG_URL the postgresql cases are skipped.
#
# A store on this server by hand (one store per database, or per schema via the options parameter):
#   .venv/bin/wisemem --store /tmp/pgstore init --model DIR --catalog postgresql+psycopg://wisemem:wisemem@localhost:$PGPORT/DB
#   (or WISEMEM_CATALOG=URL); the URL is written to /tmp/pgstore/catalog.url and used by every later command.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PGROOT="${PGROOT:-/tmp/wisemem-pg}"
PGPORT="${PGPORT:-54329}"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
URL="postgresql+psycopg://wisemem:wisemem@localhost:${PGPORT}/wisemem"

as_pg() {  # the server refuses to run as root
    if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else bash -c "$*"; fi
}

if [ "${1:-}" = stop ]; then
    as_pg "$PGBIN/pg_ctl -D $PGROOT/data -m fast stop"
    exit 0
fi

if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
    apt-get install -y postgresql
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi

if [ ! -f "$PGROOT/data/PG_VERSION" ]; then
    mkdir -p "$PGROOT"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGROOT"
    as_pg "$PGBIN/initdb -D $PGROOT/data -U postgres --auth=trust -E UTF8" >"$PGROOT/initdb.log"
fi
if ! as_pg "$PGBIN/pg_ctl -D $PGROOT/data status" >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl -D $PGROOT/data -l $PGROOT/server.log \
        -o '-p $PGPORT -k $PGROOT -c listen_addresses=localhost' -w start"
fi
PSQL="$PGBIN/psql -h localhost -p $PGPORT -U postgres -v ON_ERROR_STOP=1 -Atq"
if [ -z "$(as_pg "$PSQL -c \"SELECT 1 FROM pg_roles WHERE rolname = 'wisemem'\"")" ]; then
    as_pg "$PSQL -c \"CREATE USER wisemem PASSWORD 'wisemem' CREATEDB\""
fi
if [ -z "$(as_pg "$PSQL -c \"SELECT 1 FROM pg_database WHERE datname = 'wisemem'\"")" ]; then
    as_pg "$PSQL -c 'CREATE DATABASE wisemem OWNER wisemem'"
fi

cd "$REPO"
.venv/bin/python -c "import psycopg" 2>/dev/null || .venv/bin/pip install "psycopg[binary]"

export OMP_WAIT_POLICY=PASSIVE
echo "== SQLite only (PostgreSQL cases skipped)"
env -u WISEMEM_TEST_PG_URL .venv/bin/python -m pytest -q tests/test_store.py
echo "== SQLite and PostgreSQL ($URL)"
WISEMEM_TEST_PG_URL="$URL" .venv/bin/python -m pytest -q tests/test_store.py
