#!/usr/bin/env python3
"""Reference values of the per-operation CPU kernels (core/ops_cpu.h) from PyTorch + transformers.

Writes tests/fixtures/ops/ops_ref.safetensors: random inputs, the outputs and the input gradients
(autograd of sum(gout * out)) of the HF LLaMA building blocks, computed by the real transformers code:
  rmsnorm.*   LlamaRMSNorm
  rope_default.*, rope_llama3.*, rope_far.*
              LlamaRotaryEmbedding (rope_type default / llama3) + apply_rotary_pos_emb
  attn.*      transformers' sdpa_attention_forward with the mask of create_causal_mask (GQA, causal,
              right padding)
  swiglu.*    silu(gate) * up
  ce.*        lm_head matmul + ForCausalLMLoss (labels shifted inside, ignore_index -100, mean)
  adamw.*     torch.optim.AdamW, 3 steps
Scalars (eps, theta, ...) are in __metadata__. Layouts are mosft's: [B][S][H][D] for q/k/v.

  /opt/ref/bin/python scripts/ref_ops_torch.py [out.safetensors]

tests/test_ops_cpu.c reads the file, so CI needs no Python. Re-run only when the set of checks changes.
"""
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

torch.manual_seed(1234)
out = {}
meta = {"torch": torch.__version__, "transformers": transformers.__version__,
        "script": "scripts/ref_ops_torch.py"}


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def i32(t):
    return t.detach().to(torch.int32).contiguous().clone()


# ---- RMSNorm ----
T, C, eps = 7, 48, 1e-5
norm = LlamaRMSNorm(C, eps=eps)
with torch.no_grad():
    norm.weight.copy_(torch.rand(C) + 0.5)
x = (torch.randn(T, C) * 1.7 + 0.2).requires_grad_()
y = norm(x)
gy = torch.randn(T, C)
y.backward(gy)
out.update({"rmsnorm.x": f32(x), "rmsnorm.weight": f32(norm.weight), "rmsnorm.y": f32(y), "rmsnorm.gy": f32(gy),
            "rmsnorm.gx": f32(x.grad)})
meta["rmsnorm.eps"] = repr(eps)


# ---- RoPE ----
def rope_case(name, cfg, pos, B, H, D):
    rot = LlamaRotaryEmbedding(cfg)
    S = pos.shape[1]
    q = torch.randn(B, S, H, D).requires_grad_()
    cos, sin = rot(q, pos)  # [B][S][D]
    # HF works on [B][H][S][D]; apply_rotary_pos_emb unsqueezes cos/sin on dim 1.
    qt = q.transpose(1, 2)
    q_emb, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
    y = q_emb.transpose(1, 2)
    gy = torch.randn_like(y)
    y.backward(gy)
    out.update({f"{name}.x": f32(q), f"{name}.pos": i32(pos), f"{name}.inv_freq": f32(rot.inv_freq),
                f"{name}.y": f32(y), f"{name}.gy": f32(gy), f"{name}.gx": f32(q.grad)})


D = 16
cfg_default = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, head_dim=D,
                          max_position_embeddings=2048, rope_theta=10000.0)
rope_case("rope_default", cfg_default, torch.arange(10).repeat(2, 1), B=2, H=3, D=D)
meta["rope_default.theta"] = "10000"
llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
cfg_llama3 = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, num_key_value_heads=2, head_dim=D,
                         max_position_embeddings=131072, rope_parameters=llama3)
assert LlamaRotaryEmbedding(cfg_llama3).rope_type == "llama3"
rope_case("rope_llama3", cfg_llama3, torch.arange(10).repeat(2, 1), B=2, H=3, D=D)
# Far positions: the fp32 angle pos * inv_freq must be formed exactly as HF forms it.
far = torch.tensor([[0, 1, 7, 100, 1000, 4095, 8191, 20000, 65535, 131071]])
rope_case("rope_far", cfg_llama3, far, B=1, H=2, D=D)
for k in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
    meta[f"rope_llama3.{k}"] = repr(llama3[k])

# ---- attention: GQA, causal, right padding ----
B, S, Hq, Hkv, D = 3, 9, 6, 2, 8
lengths = [9, 5, 1]
mask = torch.zeros(B, S, dtype=torch.long)
for b, n in enumerate(lengths):
    mask[b, :n] = 1
cfg_attn = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D)
cfg_attn._attn_implementation = "sdpa"
embeds = torch.zeros(B, S, Hq * D)
pos_ids = torch.arange(S).repeat(B, 1)
mask4 = create_causal_mask(config=cfg_attn, inputs_embeds=embeds, attention_mask=mask, past_key_values=None,
                           position_ids=pos_ids, allow_is_causal_skip=False)


class _Attn(torch.nn.Module):
    num_key_value_groups = Hq // Hkv
    is_causal = True


q = torch.randn(B, S, Hq, D).requires_grad_()
k = torch.randn(B, S, Hkv, D).requires_grad_()
v = torch.randn(B, S, Hkv, D).requires_grad_()
o, _ = sdpa_attention_forward(_Attn(), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask4,
                              scaling=D ** -0.5)  # -> [B][S][Hq][D]
go = torch.randn_like(o)
o.backward(go)
out.update({"attn.q": f32(q), "attn.k": f32(k), "attn.v": f32(v), "attn.mask": i32(mask), "attn.out": f32(o),
            "attn.gout": f32(go), "attn.gq": f32(q.grad), "attn.gk": f32(k.grad), "attn.gv": f32(v.grad)})

# ---- SwiGLU ----
gate = (torch.randn(5, 24) * 2.5).requires_grad_()
up = torch.randn(5, 24).requires_grad_()
y = torch.nn.functional.silu(gate) * up
gy = torch.randn_like(y)
y.backward(gy)
out.update({"swiglu.gate": f32(gate), "swiglu.up": f32(up), "swiglu.y": f32(y), "swiglu.gy": f32(gy),
            "swiglu.ggate": f32(gate.grad), "swiglu.gup": f32(up.grad)})

# ---- lm_head + causal LM cross-entropy ----
B, S, C, V = 2, 7, 32, 50
h = torch.randn(B, S, C).requires_grad_()
W = torch.randn(V, C) * 0.3
labels = torch.randint(0, V, (B, S))
labels[0, :2] = -100  # prompt tokens
labels[1, 5:] = -100  # padding
logits = h @ W.t()
loss = ForCausalLMLoss(logits, labels, vocab_size=V)
loss.backward()
out.update({"ce.h": f32(h), "ce.W": f32(W), "ce.labels": i32(labels), "ce.logits": f32(logits),
            "ce.loss": f32(loss.reshape(1)), "ce.gh": f32(h.grad)})

# ---- AdamW: 3 steps ----
n, lr, betas, adam_eps, wd = 33, 1e-2, (0.9, 0.999), 1e-8, 0.1
p = torch.nn.Parameter(torch.randn(n))
out["adamw.p0"] = f32(p)
opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=adam_eps, weight_decay=wd)
for step in range(1, 4):
    g = torch.randn(n) * (0.1 if step == 2 else 1.0)
    p.grad = g.clone()
    opt.step()
    out[f"adamw.g{step}"] = f32(g)
    out[f"adamw.p{step}"] = f32(p)
st = opt.state[p]
out["adamw.m3"] = f32(st["exp_avg"])
out["adamw.v3"] = f32(st["exp_avg_sq"])
meta.update({"adamw.lr": repr(lr), "adamw.beta1": repr(betas[0]), "adamw.beta2": repr(betas[1]),
             "adamw.eps": repr(adam_eps), "adamw.weight_decay": repr(wd)})

path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/ops/ops_ref.safetensors"
save_file(out, path, metadata=meta)
print(f"wrote {path}: {len(out)} tensors")
