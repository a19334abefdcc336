#!/usr/bin/env python3
"""Reference training step for the CUDA backend, from transformers + PEFT.

Random small Llama-2-style (MHA, untied lm_head) and Llama-3-style (GQA, tied embeddings, llama3 rope
scaling; also one with head size 128) models are saved in bf16; PEFT LoRA (r 8, alpha 16, all 7 linears) gets random A and B; on
one padded batch with masked labels we record the loss and every LoRA gradient from
  - transformers + PEFT in bf16 (what a user of HF trains with), and
  - the same bf16 weights upcast to fp32 (the exact reference).
Writes, for each style, OUT/<style>/ (config.json in the transformers 4.x layout, with top-level
rope_theta / rope_scaling, and model.safetensors in bf16) and OUT/<style>_ref.safetensors (the batch,
the LoRA values, both gradients; losses in the metadata).
tests/gpu/test_hf_ref.c (run with MOSFT_HF_REF=OUT) trains one step with mosft's CUDA backend on the
same model, adapter and batch, and compares.

usage: python3 scripts/ref_gpu_step.py OUT [--device cuda|cpu]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

STYLES = {
    "llama2": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=32, vocab_size=1000, rope_theta=10000.0, tie_word_embeddings=False,
                   max_position_embeddings=512, rms_norm_eps=1e-5),
    "llama3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32, vocab_size=2048, rope_theta=500000.0, tie_word_embeddings=True,
                   max_position_embeddings=512, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64}),
    # head size 128, as the real models: on an H100 the warpgroup attention kernels run this one
    "llama3_d128": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=128, vocab_size=2048, rope_theta=500000.0,
                        tie_word_embeddings=True, max_position_embeddings=512, rms_norm_eps=1e-5),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(base, r, alpha):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS))


def lora_params(model):
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stories", default="tests/fixtures/stories260K",
                    help="also the real pretrained stories260K (HF folder), rounded to bf16: style 'stories'")
    ap.add_argument("--stories-ref", default="",
                    help="stories260K_lora_ref.safetensors: take the stories batch and LoRA r=4 values from it")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    os.makedirs(a.out, exist_ok=True)
    styles = dict(STYLES)
    if a.stories and os.path.isdir(a.stories):
        styles["stories"] = None
    for style, c in styles.items():
        torch.manual_seed(1234)
        if c is None:  # a real trained model: its own config and weights
            base = LlamaForCausalLM.from_pretrained(a.stories, dtype=torch.bfloat16)
            cfg = base.config
            c = dict(vocab_size=cfg.vocab_size, rope_theta=float(getattr(cfg, "rope_theta", None) or 10000.0))
        else:
            cfg = LlamaConfig(**c, bos_token_id=1, eos_token_id=2)
            base = LlamaForCausalLM(cfg).to(torch.bfloat16)
            for n, p in base.named_parameters():  # norms away from 1 so that they matter
                if "norm" in n:
                    with torch.no_grad():
                        p.copy_(1.0 + 0.2 * torch.randn_like(p.float()))
        d = os.path.join(a.out, style)
        base.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            j = json.load(f)
        j["rope_theta"] = c["rope_theta"]
        j["rope_scaling"] = c.get("rope_scaling")
        j["torch_dtype"] = "bfloat16"
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(j, f, indent=2)
        # the batch: B=2, S=61; row 1 right-padded; the first 6 labels of each row masked
        B, S, V = 2, 61, c["vocab_size"]
        g = torch.Generator().manual_seed(99)
        ids = torch.randint(3, V, (B, S), generator=g)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S - 9:] = 0
        ids[1, S - 9:] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[:, :6] = -100
        # LoRA values
        r, alpha = 8, 16
        vals = {}
        if style == "stories" and a.stories_ref:  # the CPU engine's oracle batch and LoRA values (real text)
            from safetensors.torch import load_file
            ref = load_file(a.stories_ref)
            ids, mask, labels = ref["input_ids"].long(), ref["attention_mask"].long(), ref["labels"].long()
            r, alpha = 4, 16
            vals = {k[len("param/"):]: v.float() for k, v in ref.items() if k.startswith("param/")}
        results = {}
        for prec in ["bf16", "fp32"]:
            m = LlamaForCausalLM(cfg)
            m.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
            m = m.to(torch.bfloat16 if prec == "bf16" else torch.float32).to(a.device)
            pm = lora_model(m, r, alpha)
            ps = lora_params(pm)
            if not vals:
                gv = torch.Generator().manual_seed(7)
                vals = {n: (0.05 * torch.randn(p.shape, generator=gv)).float() for n, p in sorted(ps.items())}
            with torch.no_grad():
                for n, p in ps.items():
                    p.copy_(vals[n].to(p.dtype))
            pm.train()
            out = pm(input_ids=ids.to(a.device), attention_mask=mask.to(a.device), labels=labels.to(a.device))
            out.loss.backward()
            results[prec] = (float(out.loss), {n: p.grad.detach().float().cpu() for n, p in ps.items()})
            print(f"{style} {prec}: loss {float(out.loss):.6f}, lora dtype {next(iter(ps.values())).dtype}")
        t = {"input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int32), "labels": labels.to(torch.int32)}
        for n, v in vals.items():
            t["param/" + n] = v.contiguous()
            t["grad_bf16/" + n] = results["bf16"][1][n].contiguous()
            t["grad_fp32/" + n] = results["fp32"][1][n].contiguous()
        num = sum(float(((results["bf16"][1][n] - results["fp32"][1][n]) ** 2).sum()) for n in vals)
        den = sum(float((results["fp32"][1][n] ** 2).sum()) for n in vals)
        meta = dict(style=style, lora_r=str(r), lora_alpha=str(alpha), loss_bf16=repr(results["bf16"][0]),
                    loss_fp32=repr(results["fp32"][0]), hf_bf16_grad_rel_l2=repr((num / den) ** 0.5))
        save_file(t, os.path.join(a.out, f"{style}_ref.safetensors"), metadata=meta)
        print(f"{style}: HF bf16 vs fp32 gradients rel L2 {(num / den) ** 0.5:.3g}")


if __name__ == "__main__":
    main()
