#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised: gives the deploy workers a
# database and a role of their own, apart from Temporal's databases. The worker creates
# its schema (PG_DB_SCHEMA) and tables itself.
set -eu

# psql's :"name" and :'value' quote the identifiers and the password, so none of them is
# spliced into SQL as raw text.
psql --no-psqlrc -v ON_ERROR_STOP=1 \
  --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
  -v app_user="$APP_DB_USER" -v app_password="$APP_DB_PASSWORD" -v app_db="$APP_DB_NAME" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
SQL
