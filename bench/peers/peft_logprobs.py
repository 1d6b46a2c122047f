#!/usr/bin/env python3
"""Hugging Face PEFT log-prob peer: teacher-forced log-probs of the GGUF backbone, bare or with
a PEFT adapter (an expert exported by roe, or one trained by peft_train.py).

Input: one JSON object, from the file named by the first argument, or from stdin when there
is no argument (or it is "-"):

    {"gguf": "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",   # required
     "adapter_dir": "assets/experts/smollm2-135m/lora/sms_spam" | null,  # null: bare backbone
     "sequences": [[id, ...], ...],                                     # required, len >= 1
     "top_k": 5,
     "threads": 2}

The base model is loaded by transformers from the GGUF file (dequantized to float32); the
adapter (adapter_config.json + adapter_model.safetensors) with PeftModel.from_pretrained.
Each sequence runs alone (no padding), on the CPU, in eval mode under torch.no_grad().

Output (stdout, one JSON document; logs go to stderr):

    {"logprobs": [[log p(ids[i+1] | ids[..=i]) for i in 0..len-1] per sequence],
     "top5": [[[id, logprob] x top_k] of the last position's next-token distribution, per seq],
     "peft_type": "PROMPT_TUNING" | "LORA" | null, "num_virtual_tokens": 0 | n,
     "load_seconds", "seconds", "threads", "loadavg", "torch", "transformers", "peft"}

Log-softmax is taken in float64 over float32 logits. For a prompt-tuning adapter PEFT prepends
its virtual tokens (positions 0..n-1, as roe does) and its logits include those positions: only
the positions of the real tokens are returned.
"""
import json
import os
import sys
import time

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*a):
    print("[peft_logprobs]", *a, file=sys.stderr, flush=True)


def read_request():
    src = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    raw = open(src, encoding="utf-8").read() if src else sys.stdin.read()
    req = json.loads(raw)
    for k in ("gguf", "sequences"):
        if k not in req:
            raise SystemExit(f'input needs "{k}"')
    for i, s in enumerate(req["sequences"]):
        if not s:
            raise SystemExit(f"sequence {i} is empty")
    return req


def main():
    req = read_request()
    threads = int(req.get("threads", 2))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)

    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    k = int(req.get("top_k", 5))

    t0 = time.perf_counter()
    d, f = os.path.split(os.path.abspath(req["gguf"]))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.config.use_cache = False
    peft_type, nv = None, 0
    if req.get("adapter_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, req["adapter_dir"], is_trainable=False)
        cfg = model.active_peft_config
        peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        nv = int(cfg.num_virtual_tokens) if cfg.is_prompt_learning else 0
    model.eval()
    load_s = time.perf_counter() - t0
    log(f"loaded {req['gguf']}" + (f" + {req['adapter_dir']} ({peft_type}, {nv} virtual tokens)"
                                  if peft_type else " (bare)") + f" in {load_s:.2f}s")

    lps, tops = [], []
    t1 = time.perf_counter()
    with torch.no_grad():
        for seq in req["sequences"]:
            ids = torch.tensor([list(seq)], dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           use_cache=False).logits[0]
            extra = logits.shape[0] - len(seq)  # virtual tokens prepended by prompt tuning
            if extra != nv:
                raise SystemExit(f"logits have {logits.shape[0]} positions for {len(seq)} ids "
                                 f"and {nv} virtual tokens")
            lp = torch.log_softmax(logits[extra:].double(), dim=-1)
            nxt = ids[0, 1:]
            lps.append([float(x) for x in lp[:-1].gather(1, nxt[:, None])[:, 0]])
            v, i = lp[-1].topk(k)
            tops.append([[int(a), float(b)] for a, b in zip(i, v)])
    secs = time.perf_counter() - t1

    out = {"logprobs": lps, "top5": tops, "top_k": k, "peft_type": peft_type,
           "num_virtual_tokens": nv, "adapter_dir": req.get("adapter_dir"),
           "load_seconds": load_s, "seconds": secs, "threads": threads,
           "loadavg": list(os.getloadavg())}
    for p in ("torch", "transformers", "peft"):
        out[p] = md.version(p)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
