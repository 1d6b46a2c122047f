#!/usr/bin/env python3
"""Hugging Face PEFT training peer for roe's prompt-tuning / LoRA trainer benchmarks.

Trains a soft prompt or a LoRA adapter on the frozen SmolLM2 backbone (loaded from the same
GGUF file roe uses, dequantized to float32 by transformers), with the same rows, batches and
optimizer recipe as roe, on the CPU, and times the steps.

Input: one JSON object, from the file named by the first argument, or from stdin when there
is no argument (or it is "-"):

    {"gguf": "models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf",   # required
     "kind": "prompt" | "lora",                                                 # required
     "examples": [{"prompt_ids": [...], "target_ids": [...]}, ...],             # required
     "batches": [[row, ...], ...],  # row indices of each step's batch, in order; one step each
     "lr": 0.03, "warmup_steps": 20, "total_steps": 300, "weight_decay": 0.0,
     "max_grad_norm": null,         # optional gradient-norm clipping (default: none)
     "num_virtual_tokens": 20, "init_ids": [...],            # prompt
     "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},   # lora
     "threads": 2,                  # torch.set_num_threads (and OMP_NUM_THREADS)
     "warmup_batches": 1,           # the first N entries of "batches" run untimed
     "logits": "targets",           # "targets": lm_head only on the positions that predict a
                                    # target (as roe does); "all": every position (labels= way)
     "seed": 0,                     # torch.manual_seed (LoRA A init, PEFT's random prompt init)
     "pad_id": 2,
     "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",  # written when saving
     "save_dir": null}              # optional: save_pretrained the trained adapter there

Rows: input = prompt_ids + target_ids[:-1], right-padded with pad_id (attention_mask 0 there);
the loss is the cross-entropy of target_ids[j] at input position len(prompt_ids) - 1 + j, mean
over all target tokens of the batch. For "prompt", PEFT prepends the virtual tokens itself (and
their positions are dropped from the logits). Optimizer: torch AdamW (betas 0.9/0.999, eps
1e-8, weight_decay), LR from transformers' get_linear_schedule_with_warmup(warmup_steps,
total_steps), stepped once per batch, warm-up batches included (they are the first steps of the
recipe; they are only left out of the timing). total_steps may exceed len(batches).

Output (stdout, one JSON document; logs go to stderr):

    {"kind", "steps" (timed), "seconds", "steps_per_s", "tokens_per_s", "tokens" (timed real
     tokens: sum of len(prompt_ids) + len(target_ids) - 1 per row, no virtual tokens or
     padding), "target_tokens", "losses" (every step, warm-up included), "lrs" (the LR each
     step used), "step_seconds", "cpu_seconds" (process CPU time of the timed steps),
     "trainable_params", "peak_rss_mb", "load_seconds", "threads", "logits", "loadavg",
     "torch", "transformers", "peft", "saved_to"}
"""
import json
import os
import resource
import sys
import time

# CPU only, offline: set before torch / transformers are imported.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*a):
    print("[peft_train]", *a, file=sys.stderr, flush=True)


def read_request():
    src = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
    raw = open(src, encoding="utf-8").read() if src else sys.stdin.read()
    req = json.loads(raw)
    for k in ("gguf", "kind", "examples", "batches"):
        if k not in req:
            raise SystemExit(f'input needs "{k}"')
    if req["kind"] not in ("prompt", "lora"):
        raise SystemExit(f'unknown kind {req["kind"]!r} (prompt | lora)')
    return req


def load_base(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.config.use_cache = False
    return model


def wrap(model, req):
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if req["kind"] == "prompt":
        nv = int(req.get("num_virtual_tokens", 20))
        cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=nv,
                                 prompt_tuning_init=PromptTuningInit.RANDOM)
        pm = get_peft_model(model, cfg)
        init_ids = req.get("init_ids")
        if init_ids is not None:
            if len(init_ids) != nv:
                raise SystemExit(f"init_ids has {len(init_ids)} ids, num_virtual_tokens is {nv}")
            emb = model.get_input_embeddings().weight
            with torch.no_grad():
                w = pm.prompt_encoder["default"].embedding.weight
                w.copy_(emb[torch.tensor(init_ids, dtype=torch.long)].detach().clone())
        return pm, nv
    lo = req.get("lora") or {}
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=int(lo.get("r", 4)),
                     lora_alpha=lo.get("alpha", 8),
                     target_modules=list(lo.get("targets", ["q_proj", "v_proj"])),
                     lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg), 0


def make_batch(examples, rows, pad_id, nv, logits_mode):
    """Right-padded tensors for one step.

    Returns (input_ids, attention_mask, keep, targets, real_tokens):
      - "targets" mode: keep is a bool [B, nv + L] mask of the positions whose logits are needed
        (passed as logits_to_keep; the model returns them flattened in row-major order) and
        targets is the 1-D tensor of their target ids in the same order;
      - "all" mode: keep is None and targets is [B, L] (-100 where no target), aligned with the
        logits of the real positions (no shift: targets[b, i] is the id predicted at i).
    """
    import torch

    seqs, tgts = [], []
    for r in rows:
        ex = examples[r]
        p, t = list(ex["prompt_ids"]), list(ex["target_ids"])
        if not p or not t:
            raise SystemExit(f"row {r}: empty prompt_ids or target_ids")
        seqs.append(p + t[:-1])
        tgts.append([-100] * (len(p) - 1) + t)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, (s, t) in enumerate(zip(seqs, tgts)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
        lab[b, : len(t)] = torch.tensor(t)
    real = sum(len(s) for s in seqs)
    if logits_mode == "all":
        return ids, mask, None, lab, real
    keep = torch.zeros((len(rows), nv + L), dtype=torch.bool)
    keep[:, nv:] = lab != -100
    return ids, mask, keep, lab[lab != -100], real


def main():
    req = read_request()
    threads = int(req.get("threads", 2))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)

    import importlib.metadata as md

    import torch
    import torch.nn.functional as F
    from transformers import get_linear_schedule_with_warmup

    torch.set_num_threads(threads)
    torch.manual_seed(int(req.get("seed", 0)))

    kind = req["kind"]
    logits_mode = req.get("logits", "targets")
    if logits_mode not in ("targets", "all"):
        raise SystemExit(f'unknown logits {logits_mode!r} (targets | all)')
    examples, batches = req["examples"], req["batches"]
    n_warm = min(int(req.get("warmup_batches", 1)), len(batches))
    pad_id = int(req.get("pad_id", 2))
    for bi, rows in enumerate(batches):
        if not rows or any(not (0 <= r < len(examples)) for r in rows):
            raise SystemExit(f"batch {bi}: empty or row index outside 0..{len(examples)}")

    t0 = time.perf_counter()
    base = load_base(req["gguf"])
    model, nv = wrap(base, req)
    # get_peft_model records the local model folder; name the Hub model instead, as roe's
    # exported experts do (and so no absolute path lands in a saved adapter_config.json).
    model.peft_config["default"].base_model_name_or_path = req.get(
        "base_model_name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    load_s = time.perf_counter() - t0
    log(f"loaded {req['gguf']} + {kind} in {load_s:.2f}s: {n_trainable} trainable params, "
        f"threads={threads}, logits={logits_mode}")

    opt = torch.optim.AdamW(params, lr=float(req.get("lr", 0.03)), betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=float(req.get("weight_decay", 0.0)))
    total = int(req.get("total_steps", len(batches)))
    sched = get_linear_schedule_with_warmup(opt, int(req.get("warmup_steps", 0)), total)
    clip = req.get("max_grad_norm")

    losses, lrs, step_s = [], [], []
    timed_s = timed_cpu = 0.0
    tokens = target_tokens = 0
    for step, rows in enumerate(batches):
        ids, mask, keep, tgt, real = make_batch(examples, rows, pad_id, nv, logits_mode)
        c0, s0 = time.process_time(), time.perf_counter()
        kw = {"logits_to_keep": keep} if keep is not None else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        if keep is None:
            logits = logits[:, nv:, :]  # drop the virtual tokens' positions
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                   ignore_index=-100)
        else:
            loss = F.cross_entropy(logits.float(), tgt)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        s1, c1 = time.perf_counter(), time.process_time()
        lv = float(loss.detach())
        losses.append(lv)
        step_s.append(s1 - s0)
        n_tgt = int((tgt != -100).sum())
        if step >= n_warm:
            timed_s += s1 - s0
            timed_cpu += c1 - c0
            tokens += real
            target_tokens += n_tgt
        log(f"step {step}{' (warm-up)' if step < n_warm else ''}: loss {lv:.4f}, "
            f"lr {lrs[-1]:.3g}, {len(rows)} rows, {real} tokens, {s1 - s0:.3f}s")

    saved = None
    if req.get("save_dir"):
        saved = req["save_dir"]
        os.makedirs(saved, exist_ok=True)
        model.save_pretrained(saved)
        log(f"saved adapter to {saved}")

    steps = len(batches) - n_warm
    out = {
        "kind": kind, "steps": steps, "seconds": timed_s,
        "steps_per_s": steps / timed_s if timed_s > 0 else None,
        "tokens_per_s": tokens / timed_s if timed_s > 0 else None,
        "tokens": tokens, "target_tokens": target_tokens,
        "losses": losses, "lrs": lrs, "step_seconds": step_s, "cpu_seconds": timed_cpu,
        "warmup_batches": n_warm, "trainable_params": n_trainable,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "load_seconds": load_s, "threads": threads, "logits": logits_mode,
        "loadavg": list(os.getloadavg()), "saved_to": saved,
    }
    for p in ("torch", "transformers", "peft"):
        out[p] = md.version(p)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
