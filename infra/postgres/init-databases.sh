#!/bin/sh
# First start of the postgres container (empty data volume): one database per service, owned by
# $POSTGRES_USER. MLflow and Prefect create their own tables on start (migrations).
set -eu
for db in mlflow prefect; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\""
done
