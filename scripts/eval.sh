#!/usr/bin/env bash
# Regenerates the evaluation report (bench/results/eval.{md,json,png}): bare backbone, oracle,
# RoE-routed, merged-all, ensemble and leave-one-out on the task suite. Extra arguments go to
# `roe eval` (for instance --rows 200 for whole test sets; see `roe eval --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-models.sh
cargo build --release --bin roe --bin roe-bench
./target/release/roe eval "$@"
