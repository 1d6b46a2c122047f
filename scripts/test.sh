#!/usr/bin/env bash
# The test suite, from a fresh clone: fetch the models and make the `openai` client's venv
# (both idempotent), make sure a PostgreSQL answers for the shared library's store (the one at
# $ROE_TEST_DATABASE_URL or 127.0.0.1:5432, else a private cluster started here and stopped
# at exit: scripts/test-postgres.sh), then run every test of the workspace in release mode
# (the real encoder and backbone are too slow in debug).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-models.sh
./scripts/openai-venv.sh
# Exports ROE_TEST_DATABASE_URL; a private cluster is stopped by its EXIT trap (roe_pg_stop).
source ./scripts/test-postgres.sh
cargo test --release --workspace "$@"
