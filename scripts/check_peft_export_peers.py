#!/usr/bin/env python3
"""Check the peer adapters (PRoLoRA, VeRA, Tied-LoRA, ShareLoRA) and their `mosft export` against PEFT.

For each adapter.mos given, this script
  1. reads the adapter.mos with safetensors and computes every layer's Delta W in float64 from the
     method's parameterization (shared/docs/MOS.md section 5, written here independently of mosft's C
     code): PRoLoRA's rotated chunks, VeRA's Lambda_b B Lambda_d A on the sliced projections,
     Tied-LoRA's diag(v_i) B diag(u_i) A, ShareLoRA's shared factors;
  2. for VeRA, also builds PEFT's own VeRA model (peft.VeraConfig on the same base), loads the file's
     projections and lambda vectors into it, and compares PEFT's VeRA get_delta_weight with (1): the
     method's semantics (slicing, the order of the Lambdas, no alpha / r) against PEFT's;
  3. exports it with `mosft export`, loads the folder with PEFT (PeftModel.from_pretrained, a plain
     LoRA) and compares PEFT's get_delta_weight() of every adapted linear with (1), and the logits of
     the PEFT model with those of the base model with (1) merged in.
Prints the largest differences; exits 1 on a mismatch.

Usage (CPU is enough for stories260K):
  make build/mosft build/tests/test_export_peers
  MOSFT_EXPORT_FIXTURE_DIR=/tmp/peerfix build/tests/test_export_peers
  /opt/ref/bin/python scripts/check_peft_export_peers.py /tmp/peerfix/*.mos

Needs torch, transformers, peft, safetensors, numpy.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from safetensors import safe_open

MODULES = ["q", "k", "v", "o", "gate", "up", "down"]
HF = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
      "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def dims(base, m):
    h, inter = base["hidden_size"], base["intermediate_size"]
    q = base["num_attention_heads"] * base["head_dim"]
    kv = base["num_key_value_heads"] * base["head_dim"]
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, inter), "up": (h, inter),
            "down": (inter, h)}[m]


def prolora_factors(t, cfg, i, m, d_in, d_out):
    """MOS.md 5.1: A[k][i*c_A + j] = A0[(k + i*s_A) mod r'][j], B[i*c_B + j][k] = B0[j][(k + i*s_B) mod r']."""
    r, u = int(cfg["r"]), int(cfg["prolora_unshared_r"])
    ma, nb = int(cfg["prolora_reduce_a"]), int(cfg["prolora_reduce_b"])
    rs = r - u
    A = np.zeros((r, d_in))
    B = np.zeros((d_out, r))
    if rs > 0:
        A0, B0 = t[f"prolora.layers.{i}.{m}.A0"], t[f"prolora.layers.{i}.{m}.B0"]  # [r'][c_A], [c_B][r']
        ca, cb = A0.shape[1], B0.shape[0]
        sa, sb = max(rs // ma, 1), max(rs // nb, 1)
        for k in range(rs):
            row = np.concatenate([A0[(k + c * sa) % rs] for c in range(ma)])
            A[k] = row[:d_in]
            col = np.concatenate([B0[:, (k + c * sb) % rs] for c in range(nb)])
            B[:, k] = col[:d_out]
    if u > 0:
        A[rs:] = t[f"prolora.layers.{i}.{m}.A_u"]
        B[:, rs:] = t[f"prolora.layers.{i}.{m}.B_u"].T
    return A, B, float(cfg["alpha"]) / r


def delta_w(path):
    """cfg, base fingerprint, {(layer, module): Delta W float64} of a peer adapter.mos."""
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mos":
            raise SystemExit(f"{path}: not an adapter.mos")
        cfg = json.loads(meta["adapter_config"])
        base = json.loads(meta["base_model"])
        t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    method, L, r = cfg["method"], base["num_hidden_layers"], int(cfg["r"])
    s = float(cfg["alpha"]) / r
    out = {}
    for m in cfg["targets"]:
        d_in, d_out = dims(base, m)
        for i in range(L):
            if method == "prolora":
                A, B, sc = prolora_factors(t, cfg, i, m, d_in, d_out)
                dw = sc * B @ A
            elif method == "vera":
                A, B = t["vera.A"][:, :d_in], t["vera.B"][:d_out, :]
                lb, ld = t[f"vera.layers.{i}.{m}.lambda_b"], t[f"vera.layers.{i}.{m}.lambda_d"]
                dw = (lb[:, None] * B) @ (ld[:, None] * A)
            elif method == "tied_lora":
                A, B = t[f"tied_lora.{m}.A"], t[f"tied_lora.{m}.B"]
                u, v = t[f"tied_lora.{m}.u"][i], t[f"tied_lora.{m}.v"][i]
                dw = s * (v[:, None] * B) @ (u[:, None] * A)
            elif method == "sharelora":
                share = cfg["sharelora_share"]
                if share == "qkv" and m in ("q", "k", "v"):
                    A = t["sharelora.qkv.A"]
                elif share in ("A", "AB", "qkv"):
                    A = t[f"sharelora.{m}.A"]
                else:
                    A = t[f"sharelora.layers.{i}.{m}.A"]
                B = t[f"sharelora.{m}.B"] if share in ("B", "AB") else t[f"sharelora.layers.{i}.{m}.B"]
                dw = s * B @ A
            else:
                raise SystemExit(f"{path}: method {method!r} has no per-layer Delta W")
            out[(i, m)] = dw
    return cfg, base, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapters", nargs="+", help="adapter.mos files")
    ap.add_argument("--model", default="../shared/data/models/stories260K/hf", help="HF base model folder")
    ap.add_argument("--mosft", default="build/mosft", help="the mosft binary")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest relative difference accepted")
    args = ap.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers
    from peft import PeftModel, VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    fp32 = {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}
    torch.manual_seed(0)
    failed = False
    for path in args.adapters:
        cfg, base_fp, ours = delta_w(path)
        notes = []
        if cfg["method"] == "vera":
            # PEFT's VeRA with the file's projections and vectors: its Delta W must be ours.
            with safe_open(path, framework="pt") as f:
                tt = {k: f.get_tensor(k) for k in f.keys()}
            model = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
            vc = VeraConfig(r=int(cfg["r"]), target_modules=[f"{m}_proj" for m in cfg["targets"]],
                            vera_dropout=0.0, d_initial=float(cfg["vera_d_initial"]))
            vm = get_peft_model(model, vc)
            worst = 0.0
            for name, mod in vm.named_modules():
                if not hasattr(mod, "vera_lambda_b") or "default" not in mod.vera_lambda_b:
                    continue
                parts = name.split(".")
                i, m = int(parts[parts.index("layers") + 1]), parts[-1].replace("_proj", "")
                with torch.no_grad():
                    mod.vera_A["default"].copy_(tt["vera.A"])
                    mod.vera_B["default"].copy_(tt["vera.B"])
                    mod.vera_lambda_b["default"].copy_(tt[f"vera.layers.{i}.{m}.lambda_b"])
                    mod.vera_lambda_d["default"].copy_(tt[f"vera.layers.{i}.{m}.lambda_d"])
                    pd = mod.get_delta_weight("default").double().numpy()
                worst = max(worst, np.abs(pd - ours[(i, m)]).max() / np.abs(ours[(i, m)]).max())
            notes.append(f"PEFT VeRA vs ours {worst:.2e}")
            failed |= worst > args.tol
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "peft")
            subprocess.run([args.mosft, "export", path, "-o", out], check=True, stdout=subprocess.DEVNULL)
            pcfg = json.load(open(os.path.join(out, "adapter_config.json")))
            # float64 throughout: a small adapter's effect on the logits stays far above the rounding of
            # the merged weights.
            base = AutoModelForCausalLM.from_pretrained(args.model, **fp32).double().eval()
            ids = torch.randint(3, base.config.vocab_size, (2, 24))
            with torch.no_grad():
                logits_base = base(ids).logits.double()
            state = {k: v.detach().clone() for k, v in base.state_dict().items()}
            model = PeftModel.from_pretrained(base, out).double().eval()
            worst, merged, seen = 0.0, dict(state), set()
            for name, mod in model.named_modules():
                if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                    continue
                parts = name.split(".")
                i, m = int(parts[parts.index("layers") + 1]), parts[-1].replace("_proj", "")
                seen.add((i, m))
                with torch.no_grad():
                    pd = mod.get_delta_weight("default").double().numpy()
                worst = max(worst, np.abs(pd - ours[(i, m)]).max() / np.abs(ours[(i, m)]).max())
                key = f"model.layers.{i}.{HF[m]}.weight"
                merged[key] = state[key] + torch.from_numpy(ours[(i, m)]).to(state[key].dtype)
            with torch.no_grad():
                logits_peft = model(ids).logits.double()
                copy = AutoModelForCausalLM.from_pretrained(args.model, **fp32).double()
                copy.load_state_dict(merged)
                logits_ours = copy.eval()(ids).logits.double()
        effect = (logits_peft - logits_base).abs().max().item()
        rel_log = (logits_peft - logits_ours).abs().max().item() / max(effect, 1e-30)
        ok = worst <= args.tol and rel_log <= 1e-4 and effect > 0 and seen == set(ours)
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {path}: {cfg['method']} r {pcfg['r']} lora_alpha {pcfg['lora_alpha']}, "
              f"{len(seen)} modules: PEFT LoRA Delta W vs ours max rel diff {worst:.2e}; logits rel diff {rel_log:.2e} "
              f"(adapter effect {effect:.2e})" + (f"; {'; '.join(notes)}" if notes else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
