#!/usr/bin/env python3
"""hnswlib peer for `roe bench hnsw`: the same vectors, queries and ground truth, the same
graph settings, built and searched the way roe's index is measured.

Input: one JSON object on stdin:

    {"data": "path/data.f32",        # n x dim little-endian f32, row-major (required)
     "queries": "path/queries.f32",  # nq x dim f32 (required)
     "truth": "path/truth.u32",      # nq x 10 u32: the exact top-10 row ids (required)
     "dim": 384, "m": 16, "ef_construction": 100,
     "ef_search": [16, 32, 64, 128],
     "build_threads": 2}             # hnswlib add_items num_threads; search uses 1 thread

Output: one JSON document on stdout (logs on stderr):
    {"build_s": x, "rss_growth_bytes": b, "curve": [{"ef_search": e, "p50_ms": ..,
     "p99_ms": .., "recall_at_10": ..}, ...], "versions": {...}}

Resident memory is read from /proc/self/status before the index is created (the vectors
already loaded) and after the build, as roe's side does.
"""
import json
import sys
import time

import hnswlib
import numpy as np


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    cfg = json.load(sys.stdin)
    dim = int(cfg.get("dim", 384))
    data = np.fromfile(cfg["data"], dtype="<f4").reshape(-1, dim)
    queries = np.fromfile(cfg["queries"], dtype="<f4").reshape(-1, dim)
    truth = np.fromfile(cfg["truth"], dtype="<u4").reshape(len(queries), -1)
    n = len(data)
    rss0 = rss_bytes()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=int(cfg.get("m", 16)),
                     ef_construction=int(cfg.get("ef_construction", 100)), random_seed=100)
    log(f"hnswlib: building over {n} vectors ...")
    t = time.perf_counter()
    index.add_items(data, np.arange(n), num_threads=int(cfg.get("build_threads", 2)))
    build_s = time.perf_counter() - t
    rss_growth = rss_bytes() - rss0
    log(f"hnswlib: built in {build_s:.1f} s, RSS +{rss_growth / 2**20:.0f} MiB")
    index.set_num_threads(1)
    curve = []
    for ef in cfg.get("ef_search", [16, 32, 64, 128]):
        index.set_ef(int(ef))
        times = []
        found = 0
        for q, want in zip(queries, truth):
            t = time.perf_counter()
            labels, _ = index.knn_query(q.reshape(1, -1), k=10)
            times.append((time.perf_counter() - t) * 1000.0)
            found += len(set(labels[0].tolist()) & set(want.tolist()))
        times.sort()
        point = {
            "ef_search": int(ef),
            "p50_ms": times[len(times) // 2],
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
            "recall_at_10": found / (10 * len(queries)),
        }
        log(f"hnswlib: {point}")
        curve.append(point)
    json.dump({
        "build_s": build_s,
        "rss_growth_bytes": rss_growth,
        "curve": curve,
        "versions": {"hnswlib": getattr(hnswlib, "__version__", "0.8.0"), "numpy": np.__version__},
    }, sys.stdout)


if __name__ == "__main__":
    main()
