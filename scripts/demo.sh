#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: fetch the models, build, start the
# service, register the 23 prompt experts of the task suite (S=100 instances each), route
# Q=32 held-out test queries of every task, print the table, stop the service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/fetch-models.sh
cargo build --release --bin roe
roe=./target/release/roe

addr="${ROE_DEMO_ADDR:-127.0.0.1:50051}"
export ROE_SERVER="http://$addr"
data="$(mktemp -d)"
"$roe" serve --addr "$addr" --data-dir "$data/library" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT

for _ in $(seq 1 120); do
  "$roe" expert ls >/dev/null 2>&1 && break
  sleep 0.5
done

"$roe" expert add-suite --tasks assets/tasks --experts assets/experts/smollm2-135m --kind prompt --sample 100
"$roe" expert ls
"$roe" route --suite assets/tasks --num-queries 32 --seed 1
