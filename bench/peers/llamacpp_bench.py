#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) peer for roe's backbone benchmarks.

Input: one JSON object, from the file named by the first argument, or from stdin when there
is no argument (or it is "-"). Common fields:

    {"model": "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",  # required
     "mode": "logprobs" | "speed" | "score" | "tokenize",
     "threads": 2,          # n_threads and n_threads_batch (default 2)
     "n_ctx": 2048,         # default 2048
     "n_batch": 512}        # llama.cpp logical batch for prefill (default 512)

Modes (output: one JSON document on stdout; logs go to stderr):

  tokenize  {"texts": [...]} -> {"ids": [[...], ...]}
            Exact tokenization: add_bos=False, special=False (as the reference experts do).

  logprobs  {"texts": [...], "top_k": 5} (or "ids": [[...], ...] to skip tokenizing)
            -> {"results": [{"text", "ids", "top_ids", "top_logprobs"}]}
            top-k of the log-softmax (float64) of the last position's logits.

  score     {"items": [{"prompt": str | "prompt_ids": [...],
                        "continuation_ids": [...] | "continuation": str}], "eos": 2}
            -> {"results": [{"prompt_ids", "continuation_ids", "logprobs", "sum"}]}
            Sum of log-probs of the continuation given the prompt (logits_all=True), the way
            roe scores answer choices. With "continuation" (a string), its ids are
            tokens(continuation) followed by `eos` when "eos" is given.

  speed     {"prompt": str (optional), "prompt_tokens": 256, "new_tokens": 128, "repeats": 5}
            -> {"prefill_tok_per_s", "decode_tok_per_s" (medians), "prefill_s", "decode_s"
                (lists per repeat), "prefill_cpu_s", "decode_cpu_s" (process CPU time per
                repeat: with threads=1, a load-robust stand-in for idle-core wall time),
                "llama_perf" (llama.cpp's own counters, last repeat), ...}
            Single stream. The prompt is tokenized (no BOS) and cut or cyclically repeated to
            exactly `prompt_tokens` ids; prefill = one eval() of them on an empty KV cache;
            decode = `new_tokens` greedy steps (argmax of the last logits, fed back one token
            per eval(); EOS does not stop it, so every repeat decodes the same count). One
            untimed warm-up repeat comes first.
"""
import json
import os
import statistics
import sys
import time

import numpy as np


def log(*a):
    print("[llamacpp_bench]", *a, file=sys.stderr, flush=True)


DEFAULT_PROMPT = (
    "Retrieval of experts: given a query, find the parameter-efficient expert whose training "
    "data is closest to it, then load that expert into a frozen backbone and answer. "
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
)


def read_request():
    src = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    raw = open(src, encoding="utf-8").read() if src else sys.stdin.read()
    req = json.loads(raw)
    if "model" not in req:
        raise SystemExit('input needs "model" (path to the .gguf)')
    return req


def versions():
    import importlib.metadata as md

    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for p in ("llama_cpp_python", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def load(req, logits_all):
    from llama_cpp import Llama

    threads = int(req.get("threads", 2))
    t0 = time.perf_counter()
    llm = Llama(
        model_path=req["model"],
        n_ctx=int(req.get("n_ctx", 2048)),
        n_batch=int(req.get("n_batch", 512)),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        seed=0,
        verbose=bool(req.get("verbose", False)),
    )
    log(f"loaded {req['model']} in {time.perf_counter() - t0:.2f}s "
        f"(threads={threads}, n_ctx={llm.n_ctx()}, n_vocab={llm.n_vocab()}, logits_all={logits_all})")
    return llm


def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def last_logits_view(llm):
    """Logits of the last evaluated position, read from llama.cpp itself (a view, no copy).

    llama-cpp-python 0.3.x stores Llama.scores only when logits_all=True, so read them with
    llama_get_logits_ith(ctx, -1) instead, which works either way."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def last_logits(llm):
    return np.array(last_logits_view(llm), dtype=np.float32, copy=True)


def run_eval(llm, ids):
    llm.reset()  # n_tokens = 0; eval() then drops the KV cache from position 0 on
    llm.eval(list(ids))


def mode_tokenize(llm, req):
    return {"ids": [tokenize(llm, t) for t in req.get("texts", [])]}


def mode_logprobs(llm, req):
    k = int(req.get("top_k", 5))
    items = ([(t, tokenize(llm, t)) for t in req.get("texts", [])]
             + [(None, list(ids)) for ids in req.get("ids", [])])
    out = []
    for text, ids in items:
        if not ids:
            raise SystemExit(f"empty token list for {text!r}")
        run_eval(llm, ids)
        lp = log_softmax(last_logits(llm))
        top = np.argsort(-lp, kind="stable")[:k]
        out.append({"text": text, "ids": [int(i) for i in ids],
                    "top_ids": [int(i) for i in top],
                    "top_logprobs": [round(float(lp[i]), 6) for i in top]})
    return {"top_k": k, "results": out}


def mode_score(llm, req):
    eos = req.get("eos")
    out = []
    for it in req["items"]:
        p = list(it["prompt_ids"]) if "prompt_ids" in it else tokenize(llm, it["prompt"])
        if "continuation_ids" in it:
            c = list(it["continuation_ids"])
        else:
            c = tokenize(llm, it["continuation"]) + ([int(eos)] if eos is not None else [])
        if not p or not c:
            raise SystemExit("score needs a non-empty prompt and continuation")
        run_eval(llm, p + c)
        lps = []
        for j, tok in enumerate(c):
            row = np.asarray(llm.scores[len(p) - 1 + j], dtype=np.float32)
            lps.append(float(log_softmax(row)[tok]))
        out.append({"prompt_ids": p, "continuation_ids": c,
                    "logprobs": [round(x, 6) for x in lps], "sum": sum(lps)})
    return {"results": out}


def perf_counters(llm):
    try:
        import llama_cpp

        d = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval,
                "t_eval_ms": d.t_eval_ms, "n_eval": d.n_eval}
    except Exception as e:  # noqa: BLE001 - counters are a nicety
        return {"error": repr(e)}


def perf_reset(llm):
    try:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    except Exception:  # noqa: BLE001
        pass


def mode_speed(llm, req):
    n_prompt = int(req.get("prompt_tokens", 256))
    n_new = int(req.get("new_tokens", 128))
    reps = max(1, int(req.get("repeats", 5)))
    base = tokenize(llm, req.get("prompt") or DEFAULT_PROMPT)
    if not base:
        raise SystemExit("prompt tokenizes to nothing")
    prompt = [base[i % len(base)] for i in range(n_prompt)]
    if n_prompt + n_new > llm.n_ctx():
        raise SystemExit(f"prompt_tokens + new_tokens > n_ctx ({llm.n_ctx()})")
    eos = llm.token_eos()

    pre, dec, pre_cpu, dec_cpu, hit_eos, generated = [], [], [], [], False, []
    for r in range(reps + 1):  # repeat 0 is the warm-up
        perf_reset(llm)
        llm.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(last_logits_view(llm)))
        c1, t1 = time.process_time(), time.perf_counter()
        gen = [tok]
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits_view(llm)))
            gen.append(tok)
        c2, t2 = time.process_time(), time.perf_counter()
        # n_new tokens were produced, n_new - 1 decode evals ran (the first token comes from
        # the prefill logits): decode rate = (n_new - 1) / decode time.
        if r == 0:
            log(f"warm-up: prefill {t1 - t0:.3f}s, decode {t2 - t1:.3f}s")
            continue
        pre.append(t1 - t0)
        dec.append(t2 - t1)
        pre_cpu.append(c1 - c0)
        dec_cpu.append(c2 - c1)
        hit_eos = hit_eos or eos in gen
        generated = gen
        log(f"repeat {r}: prefill {n_prompt / (t1 - t0):.1f} tok/s, "
            f"decode {(n_new - 1) / (t2 - t1):.1f} tok/s")
    return {
        "prefill_tok_per_s": n_prompt / statistics.median(pre),
        "decode_tok_per_s": (n_new - 1) / statistics.median(dec),
        "prompt_tokens": n_prompt, "new_tokens": n_new, "decode_steps": n_new - 1,
        "repeats": reps, "prefill_s": pre, "decode_s": dec,
        "prefill_cpu_s": pre_cpu, "decode_cpu_s": dec_cpu,
        "eos_in_output": hit_eos, "generated_ids": generated,
        "generated_text": llm.detokenize(generated).decode("utf-8", "replace"),
        "llama_perf": perf_counters(llm),
    }


def main():
    req = read_request()
    mode = req.get("mode", "logprobs")
    handlers = {"tokenize": mode_tokenize, "logprobs": mode_logprobs,
                "score": mode_score, "speed": mode_speed}
    if mode not in handlers:
        raise SystemExit(f"unknown mode {mode!r} ({' | '.join(handlers)})")
    llm = load(req, logits_all=(mode == "score"))
    out = handlers[mode](llm, req)
    import resource
    out["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update({"mode": mode, "threads": int(req.get("threads", 2)), "n_ctx": llm.n_ctx(),
                "n_batch": int(req.get("n_batch", 512)), "loadavg": list(os.getloadavg()),
                "versions": versions()})
    try:
        import llama_cpp

        out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    except Exception:  # noqa: BLE001
        pass
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
