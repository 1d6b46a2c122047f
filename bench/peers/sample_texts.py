#!/usr/bin/env python3
"""Build a deterministic, mixed-length text sample for the peers' throughput runs.

    python3 bench/peers/sample_texts.py [N=256] [TASKS_DIR=assets/tasks] > texts.json

Takes the `input` field of each task's test.jsonl, round-robin over the tasks in sorted order
(row 0 of every task, then row 1, ...), until N texts: every task contributes, so lengths range
from a few words (sms, tweets) to long passages (vitaminc, reddit_qa). Writes a JSON list.
The Rust benchmark can rebuild the same list by the same rule.
"""
import json
import os
import sys

# The repository's task suite, wherever the clone lives.
DEFAULT_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "assets", "tasks")


def sample(n=256, tasks_dir=DEFAULT_TASKS):
    per_task = []
    for name in sorted(os.listdir(tasks_dir)):
        path = os.path.join(tasks_dir, name, "test.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                per_task.append([json.loads(line)["input"] for line in f if line.strip()])
    out, i = [], 0
    while len(out) < n and any(i < len(rows) for rows in per_task):
        for rows in per_task:
            if i < len(rows) and len(out) < n:
                out.append(rows[i])
        i += 1
    return out


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    d = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_TASKS
    json.dump(sample(n, d), sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
