#!/usr/bin/env python3
"""sentence-transformers peer for roe's encoder benchmarks.

Input: one JSON object, from the file named by the first argument, or from stdin when there
is no argument (or it is "-"):

    {"model_dir": "models/all-MiniLM-L6-v2",   # a sentence-transformers folder (required)
     "texts": ["...", ...],                    # required
     "mode": "embed" | "throughput",           # default "embed"
     "batch_size": 32,                         # default 32
     "threads": 2,                             # torch intra-op threads (default 2)
     "max_seq_length": 256,                    # default 256
     "warmup_texts": 32,                       # throughput: texts encoded once before timing
     "repeats": 1}                             # throughput: timed passes; the best is reported

Output: one JSON document on stdout (logs go to stderr):
    embed:      {"embeddings": [[float, ...], ...], "dim": 384, "n": N, "versions": {...}}
    throughput: {"sentences_per_s": x, "seconds": y, "n": N, "batch_size": 32,
                 "torch_threads": t, "repeats": r, "all_seconds": [...],
                 "all_cpu_seconds": [...], "loadavg": [1m, 5m, 15m], "versions": {...}}
    all_cpu_seconds is the process CPU time of each pass: with threads=1 it is a load-robust
    stand-in for the wall time on an idle core when the machine is shared.

Embeddings are L2-normalised (normalize_embeddings=True); the model is loaded offline
(HF_HUB_OFFLINE=1) on the CPU.
"""
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def log(*a):
    print("[st_embed]", *a, file=sys.stderr, flush=True)


def read_request():
    src = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    raw = open(src, encoding="utf-8").read() if src else sys.stdin.read()
    req = json.loads(raw)
    if not isinstance(req.get("texts"), list) or "model_dir" not in req:
        raise SystemExit('input needs "model_dir" and a list "texts"')
    return req


def versions():
    import importlib.metadata as md

    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for p in ("sentence-transformers", "torch", "transformers", "tokenizers", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def main():
    req = read_request()
    mode = req.get("mode", "embed")
    texts = [str(t) for t in req["texts"]]
    batch_size = int(req.get("batch_size", 32))
    threads = int(req.get("threads", 2))

    # Thread counts must be set before torch spins up its pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(req["model_dir"], device="cpu", local_files_only=True)
    model.max_seq_length = int(req.get("max_seq_length", 256))
    model.eval()
    log(f"loaded {req['model_dir']} in {time.perf_counter() - t0:.2f}s, "
        f"max_seq_length={model.max_seq_length}, torch threads={torch.get_num_threads()}")

    def encode(xs):
        with torch.inference_mode():
            return model.encode(xs, batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)

    if mode == "embed":
        emb = encode(texts) if texts else []
        out = {"embeddings": [[float(v) for v in row] for row in emb],
               "dim": int(getattr(model, "get_embedding_dimension",
                                   getattr(model, "get_sentence_embedding_dimension", None))()),
               "n": len(texts), "versions": versions()}
    elif mode == "throughput":
        if not texts:
            raise SystemExit("throughput needs at least one text")
        n_warm = int(req.get("warmup_texts", batch_size))
        t0 = time.perf_counter()
        encode(texts[: max(1, n_warm)])
        log(f"warm-up ({min(n_warm, len(texts))} texts) {time.perf_counter() - t0:.2f}s")
        secs, cpu = [], []
        for _ in range(max(1, int(req.get("repeats", 1)))):
            c0, t0 = time.process_time(), time.perf_counter()
            encode(texts)
            secs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            log(f"encoded {len(texts)} texts in {secs[-1]:.3f}s (cpu {cpu[-1]:.3f}s)")
        best = min(secs)
        out = {"sentences_per_s": len(texts) / best, "seconds": best, "n": len(texts),
               "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
               "repeats": len(secs), "all_seconds": secs, "all_cpu_seconds": cpu,
               "loadavg": list(os.getloadavg()),
               "versions": versions()}
    else:
        raise SystemExit(f"unknown mode {mode!r} (embed | throughput)")

    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
