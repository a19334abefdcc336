#!/usr/bin/env python3
"""Build tests/fixtures/data/flan_v2_cot.jsonl: Flan v2 CoT records in the exported
{"inputs", "targets"} JSONL form that open-instruct trains on, made from the real CoT source TSVs
(../shared/data/datasets/flan_v2/cot_data) with FLAN's CoT templates.

    python3 scripts/make_flan_cot_fixture.py [SHARED_DATA_DIR] > tests/fixtures/data/flan_v2_cot.jsonl

What FLAN does (google-research/FLAN flan/v2, see shared/docs/DATA.md section 1), reproduced here:
  * simple_cot_tsv: one example per line, split on TAB into question, answer, chain_of_thought;
    the two characters "\\n" become a newline in question and chain_of_thought, not in answer;
  * a template (inputs pattern, targets pattern) from flan/v2/templates.py, key cot_<dataset>
    (stream_aqua for AQuA), fills {question}, {answer}, {chain_of_thought}.
Zero-shot records (template_type zs_opt) take the first PER_DATASET lines of every TSV and
alternate between two templates per dataset: one whose inputs end with ":" (open-instruct then adds
no newline) and one that does not (it adds "\\n"). StrategyQA line 2 with template cot_strategyqa[2]
is the CoT record of shared/data/tokenizers/*/chat_vectors.jsonl.
Few-shot records (fs_opt) join 2 exemplars and the query with "\\n\\n", an exemplar being its
inputs + "\\n" + targets. FLAN's few-shot exporter has more options (prefixes, separators chosen per
template); this fixture exercises long multi-paragraph inputs, it does not claim FLAN's exact fs bytes.
"""
import json
import os
import sys

PER_DATASET = 12

# (dataset file stem, template key, [(template index, inputs pattern, targets pattern), ...])
TEMPLATES = [
    ("strategyqa", "cot_strategyqa", [
        (0, "{question}\nThink slowly and carefully, before giving your answer.",
         "{chain_of_thought}\nSo, the answer is {answer}."),
        (2, "{question}\nChain of thought:", "{chain_of_thought} The answer is {answer}."),
    ]),
    ("gsm8k", "cot_gsm8k", [
        (0, "{question} Let's think first. Chain of thought:", "{chain_of_thought}\nTherefore, the answer is {answer}."),
        (2, "{question} Let's be accurate as possible.", "{chain_of_thought}\nThe answer: {answer}."),
    ]),
    ("creak", "cot_creak", [
        (3, "Q: {question}\nChain-of-thought:", "{chain_of_thought} The answer: {answer}."),
        (2, "Give the rationale and then the answer. {question}", "{chain_of_thought} The final answer: {answer}."),
    ]),
    ("qasc", "cot_qasc", [
        (2, "Question to you: {question}.\nLet's reason step-by-step:", "{chain_of_thought} Final answer: {answer}."),
        (8, "Use reasoning to answer the following question. {question}", "{chain_of_thought}\nSo, the answer is {answer}."),
    ]),
    ("ecqa", "cot_ecqa", [
        (4, "next question: {question}\nreasoning:", "{chain_of_thought} The answer is {answer}."),
        (2, "{question} Hmmm, let me think.", "{chain_of_thought}\nSo, the answer is {answer}."),
    ]),
    ("sensemaking", "cot_sensemaking", [
        (0, "{question} Let's reason step by step:", "{chain_of_thought} Final answer: {answer}."),
        (6, "Let's think step by step! {question}\n", "{chain_of_thought} The answer: {answer}."),
    ]),
    ("aqua", "stream_aqua", [
        (1, "{question} Hmmm, my stream of consciousness:", "{chain_of_thought} So, the answer is {answer}."),
        (3, "Use some thinking to answer the following question. {question}",
         "{chain_of_thought} So the final answer is {answer}."),
    ]),
]


def read_tsv(path, n):
    """simple_cot_tsv: TAB-split, "\\n" unescaped in question and chain_of_thought only."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise SystemExit("%s: expected 3 TAB-separated fields, got %d" % (path, len(fields)))
            q, a, cot = fields
            out.append((q.replace("\\n", "\n"), a, cot.replace("\\n", "\n")))
    return out


def fill(pattern, q, a, cot):
    return pattern.format(question=q, answer=a, chain_of_thought=cot)


def main():
    shared = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
    cot_dir = os.path.join(shared, "datasets", "flan_v2", "cot_data")
    records = []
    for stem, key, tmpls in TEMPLATES:
        rows = read_tsv(os.path.join(cot_dir, stem + "_train.tsv"), PER_DATASET + 3)
        for i, (q, a, cot) in enumerate(rows[:PER_DATASET]):
            idx, pin, pout = tmpls[i % 2]
            records.append({"inputs": fill(pin, q, a, cot), "targets": fill(pout, q, a, cot), "task_source": "CoT",
                            "task_name": key, "template_type": "zs_opt", "template_idx": idx,
                            "source_line": i + 1})
        # One few-shot record per dataset: exemplars = the next two lines, query = line 1.
        idx, pin, pout = tmpls[0]
        shots = [fill(pin, *r) + "\n" + fill(pout, *r) for r in rows[PER_DATASET:PER_DATASET + 2]]
        q, a, cot = rows[0]
        records.append({"inputs": "\n\n".join(shots + [fill(pin, q, a, cot)]), "targets": fill(pout, q, a, cot),
                        "task_source": "CoT", "task_name": key, "template_type": "fs_opt", "template_idx": idx,
                        "source_line": 1})
    out = sys.stdout
    for r in records:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
