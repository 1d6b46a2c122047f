#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: fetch the models, build, start the
# service, register the 23 prompt experts of the task suite (S=100 instances each), route
# Q=32 held-out test queries of every task, print the table, then answer held-out rows of two
# tasks on the frozen backbone with the expert that routing picked, and stop the service.
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

# Route, then infer: the routed expert answers held-out rows on the shared backbone.
python3 - <<'PY' >"$data/rows.tsv"
import json
for task, n in (("sms_spam", 3), ("tweet_sentiment", 3)):
    labels = json.load(open(f"assets/tasks/{task}/task.json"))["labels"]
    rows = [json.loads(l) for l in open(f"assets/tasks/{task}/test.jsonl")][-n:]
    for r in rows:
        print("\t".join([task, r["input"].replace("\t", " ").replace("\n", " "), r["target"], "|".join(labels)]))
PY
echo
echo "== route, then answer with the routed expert (held-out rows)"
while IFS=$'\t' read -r task input target labels; do
  expert="$("$roe" route --from "assets/tasks/$task" --num-queries 32 --seed 2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["expert_id"])')"
  args=()
  IFS='|' read -ra choices <<<"$labels"
  for c in "${choices[@]}"; do args+=(--choice "$c"); done
  answer="$("$roe" score --expert "$expert" --input "$input" "${args[@]}" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][r["best"]]["choice"])')"
  printf '%-16s routed to %-16s answer %-10s truth %-10s %.60s\n' "$task" "$expert" "$answer" "$target" "$input"
done <"$data/rows.tsv"
