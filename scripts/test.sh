#!/usr/bin/env bash
# The test suite, from a fresh clone: fetch the models and make the `openai` client's venv
# (both idempotent), then run every test of the workspace in release mode (the real encoder
# and backbone are too slow in debug).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-models.sh
./scripts/openai-venv.sh
cargo test --release --workspace "$@"
