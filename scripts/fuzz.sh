#!/usr/bin/env bash
# Fuzzes the readers of client input with cargo-fuzz (nightly Rust and `cargo install
# cargo-fuzz`): each target for SECONDS (default 600), all at once, from its corpus and the
# hand-made inputs in fuzz/seeds/<target>/, then minimises each corpus in fuzz/corpus/<target>/
# (both committed; `cargo test -p roe-fuzzing` replays them on stable, and the test suite runs
# that). A crash leaves its input in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
secs=${1:-600}
targets=(peft_adapter instances_jsonl proto_messages)
cargo +nightly fuzz build -O
pids=()
for t in "${targets[@]}"; do
  cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -max_len=4096 \
    > "target/fuzz-$t.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!targets[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "${targets[$i]}: FAILED (see fuzz/target/fuzz-${targets[$i]}.log and fuzz/artifacts/)"
    status=1
  fi
  tail -n 3 "target/fuzz-${targets[$i]}.log"
done
for t in "${targets[@]}"; do
  cargo +nightly fuzz cmin -O "$t" > "target/cmin-$t.log" 2>&1
  echo "$t: $(ls "corpus/$t" | wc -l) inputs kept"
done
exit $status
