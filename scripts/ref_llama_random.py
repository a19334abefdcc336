#!/usr/bin/env python3
"""Reference for the CPU engine on random small LLaMA models, computed by transformers + PEFT (fp32).

Writes, for each style, a HF model folder and a reference file in the same layout as
shared/data/reference/stories260K_lora_ref.safetensors (input_ids, attention_mask, labels, logits,
loss, base_loss, param/<peft name>, grad/<peft name>, step_losses, step_grad_norms), which
tests/test_engine_cpu.c compares the mosft CPU backend against:

  llama3_tiny: Llama-3 style: grouped-query attention (8 q / 2 kv heads), tied embeddings,
               rope_theta 500000 with llama3 rope_scaling, rms_norm_eps 1e-5
  llama2_tiny: Llama-2 style: multi-head attention, separate lm_head, rope_theta 10000, eps 1e-6

Run (CPU torch is enough):  python3 scripts/ref_llama_random.py tests/fixtures
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

STYLES = {
    "llama3_tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=8, vocab_size=384, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        bos_token_id=1, eos_token_id=2),
    "llama2_tiny": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=6, vocab_size=320, max_position_embeddings=2048,
                        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2),
}


def make(style, out_dir, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**STYLES[style], hidden_act="silu", attention_bias=False, mlp_bias=False)
    cfg.torch_dtype = "float32"
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # larger than the default init, so the model is far from uniform
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    mdir = os.path.join(out_dir, style)
    model.save_pretrained(mdir, safe_serialization=True)

    B, S, V = 3, 40, cfg.vocab_size
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    lens = [S, S - 7, S - 19]  # right padding
    labels = ids.clone()
    for b, L in enumerate(lens):
        mask[b, L:] = 0
        ids[b, L:] = 0
        labels[b, L:] = -100
        labels[b, : 5 + 3 * b] = -100  # a masked prompt
    base_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    lcfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    gp = torch.Generator().manual_seed(seed + 2)
    params = {}
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gp))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            params[n.replace(".default", "")] = p
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int32), "labels": labels.to(torch.int32),
        "logits": out.logits.detach().contiguous(),
    }
    for n, p in params.items():
        tensors["param/" + n] = p.detach().clone().contiguous()
        tensors["grad/" + n] = p.grad.detach().clone().contiguous()
    opt = torch.optim.AdamW([p for p in params.values()], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for k in range(4):
        opt.zero_grad()
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 0.3)
        losses.append(loss.item())
        norms.append(norm.item())
        if k < 3:
            opt.step()
    tensors["step_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["step_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    meta = {"what": f"transformers+peft LoRA reference on a random {style} model (fp32, CPU)",
            "lora_r": "4", "lora_alpha": "16", "loss": repr(out.loss.item()), "base_loss": repr(base_loss),
            "optimizer": "AdamW lr=1e-3 betas=(0.9,0.999) eps=1e-8 wd=0, clip_grad_norm 0.3 before each step",
            "torch": torch.__version__, "seed": str(seed)}
    save_file(tensors, os.path.join(out_dir, f"{style}_lora_ref.safetensors"), metadata=meta)
    print(f"{style}: loss {out.loss.item():.6f} base {base_loss:.6f} steps {losses}")


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    make("llama3_tiny", out, 11)
    make("llama2_tiny", out, 23)
