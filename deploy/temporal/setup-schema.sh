#!/bin/sh
# Creates Temporal's two databases on PostgreSQL and brings their schemas to the version the
# server image expects, with the temporal-sql-tool of the matching temporalio/admin-tools
# image (as Temporal's own compose files do). Safe to run on every start: an existing
# database is kept, and update-schema applies only the versions it lacks.
#
# Environment: POSTGRES_SEEDS, DB_PORT, POSTGRES_USER, SQL_PASSWORD (read by the tool),
# SCHEMA_DIR (default /etc/temporal/schema/postgresql/v12).
set -eu

: "${POSTGRES_SEEDS:?POSTGRES_SEEDS must name the PostgreSQL host}"
: "${POSTGRES_USER:?POSTGRES_USER must name the PostgreSQL user}"
schema_dir="${SCHEMA_DIR:-/etc/temporal/schema/postgresql/v12}"

sql() {
  temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "${DB_PORT:-5432}" \
    -u "$POSTGRES_USER" "$@"
}

for pair in temporal:temporal temporal_visibility:visibility; do
  db="${pair%%:*}"
  dir="${pair#*:}"
  # `create` fails when the database exists (every start after the first): the schema
  # steps below still run, and fail loudly if the server cannot be reached at all.
  if sql --db "$db" create; then
    echo "database $db created"
  else
    echo "database $db not created (it exists already, or see above)"
  fi
  sql --db "$db" setup-schema -v 0.0
  sql --db "$db" update-schema -d "$schema_dir/$dir/versioned"
  echo "database $db: schema up to date"
done
