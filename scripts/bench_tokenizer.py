#!/usr/bin/env python3
"""Benchmark mosft's tokenizer against HF tokenizers on real text, one thread each, in one run.

Corpus: the CodeAlpaca 2k records and the Flan v2 CoT TSVs of ../shared/data (one document per record or
line), repeated until the encoded text is at least --min-mb MB. Both sides encode document by document with
special tokens (BOS), as a training data loader does:
  mosft: `mosft tokenize --bench docs.jsonl --repeat N` (the documents are loaded first; only encode is timed)
  HF:    Tokenizer.from_file(...).encode(doc) in a Python loop, RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
Before timing, every document's ids are compared (mosft --jsonl against HF): the figures are for identical
output. Best of --runs runs each.

Usage (from the repository root, after `make`):
    /opt/ref/bin/python scripts/bench_tokenizer.py [--mosft build/mosft] [--min-mb 20] [--runs 3]
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import glob
import json
import platform
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer
import tokenizers

SHARED = "../shared/data"


def corpus():
    docs = []
    for r in json.load(open(os.path.join(SHARED, "datasets/codealpaca/code_alpaca_2k.json"), encoding="utf-8")):
        docs.append("\n\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x))
    for path in sorted(glob.glob(os.path.join(SHARED, "datasets/flan_v2/cot_data/*.tsv"))):
        for line in open(path, encoding="utf-8"):
            f = line.rstrip("\n").split("\t")
            if len(f) >= 3:  # question, answer, chain of thought (FLAN's CoT format)
                docs.append(f[0].replace("\\n", "\n") + "\n" + f[2].replace("\\n", "\n") + " The answer is " + f[1] + ".")
    return docs


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mosft", default="build/mosft")
    ap.add_argument("--min-mb", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokenizers", default="llama2,llama3")
    a = ap.parse_args()

    docs = corpus()
    unique_bytes = sum(len(d.encode("utf-8")) for d in docs)
    repeat = max(1, -(-int(a.min_mb * 1e6) // unique_bytes))
    tmp = tempfile.mkdtemp(prefix="mosft-bench-")
    docs_path = os.path.join(tmp, "docs.jsonl")
    with open(docs_path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print("corpus: %d documents, %.2f MB unique, repeated %dx = %.2f MB per run" %
          (len(docs), unique_bytes / 1e6, repeat, unique_bytes * repeat / 1e6))
    print("machine: %s, %d CPUs visible; HF tokenizers %s, Python %s; one thread each, best of %d" %
          (cpu_name(), os.cpu_count(), tokenizers.__version__, platform.python_version(), a.runs))
    rows = []
    for name in a.tokenizers.split(","):
        tpath = os.path.join(SHARED, "tokenizers", name, "tokenizer.json")
        hf = Tokenizer.from_file(tpath)

        # Exactness first: every document, mosft --jsonl vs HF.
        out = subprocess.run([a.mosft, "tokenize", "--tokenizer", tpath, "--jsonl"], stdin=open(docs_path, "rb"),
                             capture_output=True, check=True)
        got = [json.loads(l)["ids"] for l in out.stdout.decode().splitlines()]
        want = [e.ids for e in hf.encode_batch(docs)]
        diff = sum(1 for g, w in zip(got, want) if g != w) + abs(len(got) - len(want))
        if diff:
            print("%s: %d of %d documents differ from HF" % (name, diff, len(docs)))
            sys.exit(1)
        n_tokens = sum(len(w) for w in want) * repeat

        best_c = None
        for _ in range(a.runs):
            r = subprocess.run([a.mosft, "tokenize", "--tokenizer", tpath, "--bench", docs_path,
                                "--repeat", str(repeat)], capture_output=True, check=True)
            res = json.loads(r.stdout)
            assert res["tokens"] == n_tokens, (res["tokens"], n_tokens)
            best_c = res["seconds"] if best_c is None else min(best_c, res["seconds"])
        best_hf = None
        for _ in range(a.runs):
            t0 = time.perf_counter()
            for _ in range(repeat):
                for d in docs:
                    hf.encode(d)
            dt = time.perf_counter() - t0
            best_hf = dt if best_hf is None else min(best_hf, dt)
        mb = unique_bytes * repeat / 1e6
        rows.append((name, mb, n_tokens, best_c, best_hf))
        print("%s: %d documents identical to HF; %d tokens per run" % (name, len(docs), n_tokens))

    print()
    print("| tokenizer | MB | tokens | mosft MB/s | mosft tokens/s | HF MB/s | HF tokens/s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mb, nt, c, h in rows:
        print("| %s | %.1f | %d | %.2f | %.0f | %.2f | %.0f | %.2fx |" % (name, mb, nt, mb / c, nt / c, mb / h, nt / h, h / c))


if __name__ == "__main__":
    main()
