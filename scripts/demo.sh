#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: fetch the models, build, start the
# service, register the 23 prompt experts of the task suite (S=100 instances each), route
# Q=32 held-out test queries of every task, print the table, then route and answer held-out
# rows of two tasks and of a task the library has never seen, and stop the service.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

./scripts/fetch-models.sh
cargo build --release --bin roe
roe=./target/release/roe

addr="${ROE_DEMO_ADDR:-127.0.0.1:50051}"
http="${ROE_DEMO_HTTP_ADDR:-127.0.0.1:8080}"
export ROE_SERVER="http://$addr"
data="$(mktemp -d)"
# The server logs warnings only, so that its lines do not interleave with the tables.
RUST_LOG="${RUST_LOG:-warn}" "$roe" serve --addr "$addr" --http-addr "$http" \
  --data-dir "$data/library" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$data"' EXIT

for _ in $(seq 1 120); do
  "$roe" expert ls >/dev/null 2>&1 && break
  sleep 0.5
done

"$roe" expert add-suite --tasks assets/tasks --experts assets/experts/smollm2-135m --kind prompt --sample 100
"$roe" expert ls
"$roe" route --suite assets/tasks --num-queries 32 --seed 1

# Route and answer in one call (roe.v1.Answerer): Q=32 example inputs of a task route it, and
# the winner answers held-out rows of that task on the shared frozen backbone.
for task in sms_spam tweet_sentiment; do
  echo
  echo "== route and answer: $task (held-out test rows)"
  "$roe" answer --queries "assets/tasks/$task" --num-queries 32 --inputs "assets/tasks/$task" --num-inputs 6
done

# A task the library has never seen (no expert of its own): routing picks the closest expert,
# or, when no expert wins a clear share, the server's fallback (the bare backbone) answers.
echo
echo "== route and answer: a new task (ni_multirc_answerability, no expert of its own)"
"$roe" answer --queries assets/tasks-routing/ni_multirc_answerability --num-queries 32 \
  --inputs assets/tasks-routing/ni_multirc_answerability --num-inputs 6 --abstain-threshold 0.5

# The same library through the OpenAI-compatible HTTP API: `model: "auto"` routes the
# request by its own text, and the response says which expert answered and why.
echo
echo "== OpenAI-compatible HTTP API (http://$http/v1): model \"auto\""
for prompt in "WINNER!! You have been selected for a free prize. Txt CLAIM to 81010" \
  "I can't believe how good this movie was, best thing I've seen all year"; do
  curl -sf "http://$http/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"auto\", \"prompt\": \"$prompt\", \"max_tokens\": 4, \"temperature\": 0}" |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print("%16s  share %.2f  answer %r" % (r["model"], r["roe"]["winner_share"], r["choices"][0]["text"].strip()))'
done
