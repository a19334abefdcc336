#!/usr/bin/env python3
"""Check `mosft export` against Hugging Face PEFT.

For each adapter.mos given, this script
  1. reads the adapter.mos with safetensors and assembles every layer's A^i, B^i from the pools and the
     index tables itself (MOS.md 1.5, written here independently of mosft's C code), and
     Delta W^i = (alpha / r) B^i A^i in float64;
  2. exports it with `mosft export` (or takes the folder given with --export);
  3. loads the base model with transformers and the exported folder with PEFT (PeftModel.from_pretrained);
  4. compares PEFT's get_delta_weight() of every adapted linear with (1), and the logits of the PEFT
     model with those of the base model whose weights were merged with (1) by this script.
It prints the largest differences and exits 1 on a mismatch (2 on bad arguments).

Usage (CPU is enough for stories260K):
  make build/mosft build/tests/test_export
  MOSFT_EXPORT_FIXTURE_DIR=/tmp/peftfix build/tests/test_export      # writes /tmp/peftfix/*.mos (random pools)
  python scripts/check_peft_export.py /tmp/peftfix/*.mos --model ../shared/data/models/stories260K/hf

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


def bf16_round(a):
    """Round float32 values to the nearest bfloat16 (ties to even), as torch's .to(torch.bfloat16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def read_adapter(path):
    """The factors of every (layer, module) of an adapter.mos, assembled from its tensors."""
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mos":
            raise SystemExit(f"{path}: not an adapter.mos (metadata format {meta.get('format')!r})")
        cfg = json.loads(meta["adapter_config"])
        base = json.loads(meta["base_model"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    L = base["num_hidden_layers"]
    method = cfg["method"]
    alpha = float(cfg["alpha"])
    factors = {}
    for m in cfg["targets"]:
        for i in range(L):
            if method == "mos":
                pa, pb = t[f"mos.{m}.pool_A"], t[f"mos.{m}.pool_B"]   # [N][d_in/l], [N][d_out/l]
                ia, ib = t[f"mos.{m}.index_A"][i], t[f"mos.{m}.index_B"][i]  # [r*l]
                l = int(cfg["shards"])
                r = len(ia) // l
                # A^i[k][j*sa + c] = c_k PoolA[Ia[k*l+j]][c];  B^i[j*sb + c][k] = PoolB[Ib[k*l+j]][c]
                A = pa[ia].reshape(r, l * pa.shape[1]).astype(np.float32)
                B = pb[ib].reshape(r, l, pb.shape[1]).transpose(1, 2, 0).reshape(l * pb.shape[1], r)
                scale = t.get(f"mos.{m}.scale")
                if scale is not None:
                    A = (scale[i][:, None] * A).astype(np.float32)
            elif method == "lora":
                A, B = t[f"lora.layers.{i}.{m}.A"], t[f"lora.layers.{i}.{m}.B"]
                r = A.shape[0]
            else:
                raise SystemExit(f"{path}: method {method!r}: this script knows mos and lora")
            factors[(i, m)] = (A, np.ascontiguousarray(B, dtype=np.float32), r)
    return cfg, base, alpha, factors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapters", nargs="+", help="adapter.mos files")
    ap.add_argument("--model", default="../shared/data/models/stories260K/hf", help="HF base model folder")
    ap.add_argument("--export", help="an exported PEFT folder to check (one adapter only); default: run mosft export")
    ap.add_argument("--mosft", default="build/mosft", help="the mosft binary")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="export dtype when running mosft export")
    ap.add_argument("--tol", type=float, default=1e-5, help="largest relative difference accepted")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.export and len(args.adapters) != 1:
        ap.error("--export takes one adapter")

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    fp32 = {"dtype": torch.float32} if (major, minor) >= (4, 56) else {"torch_dtype": torch.float32}

    torch.manual_seed(0)
    failed = False
    for path in args.adapters:
        cfg, base_fp, alpha, factors = read_adapter(path)
        tmp = None
        out = args.export
        if not out:
            tmp = tempfile.TemporaryDirectory()
            out = os.path.join(tmp.name, "peft")
            subprocess.run([args.mosft, "export", path, "-o", out, "--dtype", args.dtype], check=True,
                           stdout=subprocess.DEVNULL)
        with safe_open(os.path.join(out, "adapter_model.safetensors"), framework="np") as f:
            exported_bf16 = any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
        pcfg = json.load(open(os.path.join(out, "adapter_config.json")))

        base = AutoModelForCausalLM.from_pretrained(args.model, **fp32).to(args.device).eval()
        cfgm = base.config
        for key, want in (("hidden_size", cfgm.hidden_size), ("num_hidden_layers", cfgm.num_hidden_layers),
                          ("intermediate_size", cfgm.intermediate_size)):
            if base_fp[key] != want:
                raise SystemExit(f"{path}: trained on {key} {base_fp[key]}, {args.model} has {want}")
        ids = torch.randint(3, cfgm.vocab_size, (2, 24), device=args.device)
        with torch.no_grad():
            logits_base = base(ids).logits.double()
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}

        model = PeftModel.from_pretrained(base, out).eval()
        # Every adapted linear of PEFT against ours.
        worst_rel, worst_abs, worst_exact, seen = 0.0, 0.0, 0.0, set()
        merged = dict(state)
        for name, mod in model.named_modules():
            if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                continue
            parts = name.split(".")
            i = int(parts[parts.index("layers") + 1])
            m = parts[-1].replace("_proj", "")
            seen.add((i, m))
            if (i, m) not in factors:
                print(f"  {name}: adapted by PEFT but not by the adapter")
                failed = True
                continue
            A, B, r = factors[(i, m)]
            if mod.r["default"] != r or abs(mod.scaling["default"] - alpha / r) > 1e-12 * alpha / r:
                print(f"  {name}: PEFT r {mod.r['default']} scaling {mod.scaling['default']}, expected r {r}, {alpha / r}")
                failed = True
            ours_exact = (alpha / r) * (B.astype(np.float64) @ A.astype(np.float64))
            Ar, Br = (bf16_round(A), bf16_round(B)) if exported_bf16 else (A, B)
            ours = (alpha / r) * (Br.astype(np.float64) @ Ar.astype(np.float64))
            with torch.no_grad():
                peft_dw = mod.get_delta_weight("default").double().cpu().numpy()
            scale = np.abs(ours).max()
            d = np.abs(peft_dw - ours).max()
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / scale)
            worst_exact = max(worst_exact, np.abs(peft_dw - ours_exact).max() / scale)
            key = f"model.layers.{i}.{HF[m]}.weight"
            merged[key] = state[key] + torch.from_numpy(ours).to(state[key].dtype).to(state[key].device)
        missing = set(factors) - seen
        if missing:
            print(f"  PEFT did not adapt {sorted(missing)[:4]} ...")
            failed = True

        # The model's output: PEFT's LoRA path against the base with our Delta W merged in.
        with torch.no_grad():
            logits_peft = model(ids).logits.double()
            base_copy = AutoModelForCausalLM.from_pretrained(args.model, **fp32).to(args.device)
            base_copy.load_state_dict(merged)
            logits_ours = base_copy.eval()(ids).logits.double()
        effect = (logits_peft - logits_base).abs().max().item()
        dlog = (logits_peft - logits_ours).abs().max().item()
        rel_log = dlog / max(effect, 1e-30)

        ok = worst_rel <= args.tol and rel_log <= 1e-4 and effect > 0
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {path}: {cfg['method']} r {pcfg['r']} lora_alpha {pcfg['lora_alpha']} "
              f"{'bf16' if exported_bf16 else 'f32'}, {len(seen)} modules: delta W max abs diff {worst_abs:.3e}, "
              f"max rel diff {worst_rel:.3e}"
              + (f" (vs the unrounded f32 factors {worst_exact:.3e})" if exported_bf16 else "")
              + f"; logits: adapter effect {effect:.3e}, PEFT vs merged-ours max abs diff {dlog:.3e} (rel {rel_log:.3e})")
        if tmp:
            tmp.cleanup()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
