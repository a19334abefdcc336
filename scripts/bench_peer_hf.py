#!/usr/bin/env python3
"""The peer of `mosft bench`: HF transformers + PEFT LoRA training steps on the same shapes.

Random-weight LlamaForCausalLM models built directly on the GPU in bf16 (no files), PEFT LoRA r=64
(alpha 16, dropout 0) on all 7 linears, AdamW on the LoRA parameters, batch 16 x 512 of random
tokens (every label supervised), with and without gradient checkpointing. Prints one JSON line per
configuration and a table. bitsandbytes is not installed on the GPU machine, so this peer has a bf16
base (the NF4 QLoRA figures of shared/docs/GPU.md are the other bar).

usage: python3 scripts/bench_peer_hf.py [--models llama2-7b,llama3.2-3b,llama2-13b] [--steps 5] [--warmup 2]
"""
import argparse
import gc
import json
import statistics
import time

import torch

MODELS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        max_position_embeddings=131072),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops_per_token(c, S):  # as mosft (core/train.c): 4 x (linears + lm_head) + attention both ways
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    d = h // hq
    lin = L * (h * hq * d + 2 * h * hkv * d + hq * d * h + 3 * h * i)
    return 4.0 * (lin + c["vocab_size"] * h) + 2.0 * (4.0 * L * hq * d * S)


def run(name, ckpt, B, S, steps, warmup):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = MODELS[name]
    cfg = LlamaConfig(**c, rms_norm_eps=1e-5, head_dim=c["hidden_size"] // c["num_attention_heads"])
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, c["vocab_size"], (B, S), device="cuda")
    setup = time.time() - t0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tps = B * S / med
    peak = torch.cuda.max_memory_allocated()
    mfu = tps * flops_per_token(c, S) / 989e12
    del model, opt, params, loss
    return dict(ms_per_step=med * 1e3, tokens_per_s=tps, peak_bytes=peak, mfu=mfu, setup_s=setup, loss=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama2-7b,llama3.2-3b,llama2-13b")
    ap.add_argument("--ckpt", default="1,0", help="gradient checkpointing settings to run (1 = on)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    import peft
    import transformers
    dev = torch.cuda.get_device_name(0)
    rows = []
    for name in a.models.split(","):
        for ck in [int(x) for x in a.ckpt.split(",")]:
            rec = dict(bench="hf_peft_lora_bf16", model=name, gradient_checkpointing=bool(ck), batch=a.batch, seq=a.seq,
                       device=dev, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
            try:
                rec.update(run(name, ck, a.batch, a.seq, a.steps, a.warmup))
            except torch.OutOfMemoryError:
                rec["error"] = "out of memory"
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print(f"{'model':<12} {'ckpt':<5} {'ms/step':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {str(r['gradient_checkpointing']):<5} {r['error']}")
        else:
            print(f"{r['model']:<12} {str(r['gradient_checkpointing']):<5} {r['ms_per_step']:9.1f} {r['tokens_per_s']:9.0f} "
                  f"{100 * r['mfu']:5.1f}% {r['peak_bytes'] / 2**30:9.2f}")


if __name__ == "__main__":
    main()
