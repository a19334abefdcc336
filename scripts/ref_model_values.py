#!/usr/bin/env python3
"""Reference numbers hard-coded in tests/test_model.c, from transformers (run with /opt/ref/bin/python
from the repository root; needs ../shared/data). Prints:
  - rotary inverse frequencies of the published Llama-3.2-3B config (llama3 rope scaling) and of
    Llama-2-7b (plain), as LlamaRotaryEmbedding computes them (fp32);
  - a few stories260K weights as AutoModelForCausalLM loads them in fp32 and in bf16, and its
    parameter count (tied lm_head counted once).
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

for name, idx in [("llama3.2-3b", [0, 1, 10, 25, 28, 29, 31, 32, 34, 35, 50, 63]), ("llama2-7b", [0, 1, 32, 63])]:
    cfg = LlamaConfig.from_pretrained(f"tests/fixtures/configs/{name}")
    inv = LlamaRotaryEmbedding(cfg).inv_freq
    for i in idx:
        print(f"{name} inv_freq[{i}] = {inv[i].item()!r}")

path = "../shared/data/models/stories260K/hf"
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
print("parameters", sum(p.numel() for p in m.parameters()))
print("tied", m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())
print("embed[5][:4]", m.model.embed_tokens.weight[5, :4].tolist())
print("layers.2.k_proj[3][:3]", m.model.layers[2].self_attn.k_proj.weight[3, :3].tolist())
print("layers.4.down_proj[63][170]", m.model.layers[4].mlp.down_proj.weight[63, 170].item())
print("norm[0], norm[2]", m.model.norm.weight[0].item(), m.model.norm.weight[2].item())
print("layers.1.post_attention_layernorm[7]", m.model.layers[1].post_attention_layernorm.weight[7].item())
mb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
print("bf16 embed[5][:4]", mb.model.embed_tokens.weight[5, :4].float().tolist())
