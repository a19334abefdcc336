#!/usr/bin/env python3
"""Generate the tokenizer oracle fixtures in tests/fixtures/tokenizers/ with HF tokenizers (Python).

CI has no Python tokenizers, so the outputs are committed; re-run after changing the string lists:
    /opt/ref/bin/python scripts/gen_tokenizer_vectors.py   (from the repository root, ../shared/data beside it)

Writes
  llama2_stress.jsonl, llama3_stress.jsonl  edge-case, random and real-text strings for the real tokenizers:
      {"text", ["hex": UTF-8 bytes when the text holds U+0000], "ids" (add_special_tokens=False),
       "ids_special" (True), "decoded" (decode(ids)), "decoded_skip" (decode(ids_special,
       skip_special_tokens=True)), ["ids_nosplit": encode_special_tokens=True, for texts with "<"]}
  bytelevel_base.json  a small byte-level BPE trained here (HF BpeTrainer, 600 tokens) on CodeAlpaca text
  variants.jsonl       tokenizers made from a base (stories260K's tokenizer.json from ../shared/data, or
                       bytelevel_base.json), each with its own cases:
      {"name", "base", "patch": {top-level key: value}, "model_patch": {model key: value},
       "vocab_drop": [tokens removed from model.vocab], "merges_as_strings": bool,
       "cases": [{"text", "ids", "ids_special", "decoded"}]}
"""
import json
import os
import random

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SHARED = "../shared/data"
OUT = "tests/fixtures/tokenizers"
rng = random.Random(20240611)

WHITESPACE = [chr(c) for c in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002,
                               0x2003, 0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029,
                               0x202F, 0x205F, 0x3000)]
NOT_WHITESPACE = ["\u200b", "\u180e", "\ufeff", "\x1c", "\x1f", "\u2060"]

HAND = [
    "", " ", "  ", "\n", "\r\n", "\t", "a", "A", "'", "''", "'s", "'S", "'ſ", "'ſa", "x'ſx", "'LL", "'Ll", "'lL",
    "'RE", "'Ve", "'M", "'D", "'T", "don't", "DON'T", "I'm", "we'll", "they're", "you've", "she'd", "it's",
    "O'Neil's", "rock'n'roll", "'", "'x", "' s", "''s", "a's'", "'\u212a", "'K",
    "12", "123", "1234", "12345678", "1,234,567.89", "3.14159", "-42", "1e10", "0x1F", "٣٤٥", "١٢٣٤", "४२", "²³",
    "½", "Ⅻ", "①②③④", "𝟙𝟚𝟛𝟜", "\U0001ccf0\U0001ccf1\U0001ccf2\U0001ccf3",
    "hello world", "Hello  world", "hello   world  ", "  leading", "trailing  ", " \n ", "\n\n\n", "a\n\nb",
    "a \n b", "a\r\n\r\nb", "line1\r\nline2\r\n", "\t\tindented", "x\t\ty", "a \t b", "   \n   \n", "end \n",
    "!!!", "?!", " !!", " ! ", "...\n", "--\n\n", "#include <stdio.h>\n", "a+b=c", "(x)", "[1, 2]", "{\"k\": 1}",
    "def f(x):\n    return x + 1\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    "    if x:\n        pass\n\n", "SELECT * FROM t WHERE a = 'b';", "https://example.com/a?b=c&d=e",
    "naïve café résumé", "Ñandú", "Straße", "ǅemal", "İstanbul", "ﬁne", "e\u0301", "a\u0300\u0301\u0302",
    "\u0301abc", "x\u20dd", "Привет, мир!", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया",
    "สวัสดีชาวโลก", "Xin chào thế giới", "こんにちは世界", "你好，世界！", "안녕하세요 세계", "中文 English 混合",
    "𠀀𠀁𠀂", "\U0002ebf0\U0002ebf1", "\U00031350x", "\U00016d43\U00016d44", "\U00010d50a", "\U00011db0\U00011db1",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪", "❤️", "a😀b", " 😀 ", "😀😀😀", "\u2603\ufe0f", "©®™",
    "▁", "▁▁", "a▁b", " ▁ ", "▁hello", "hello▁", "\u2581\u2581\u2581 x",
    "<s>", "</s>", "<unk>", "<s></s>", "a<s>b", "a <s> b", "Hello <s> world", "</s>\n<|user|>", "4</s>\n",
    "<|user|>\nhi\n<|assistant|>\nyo</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|><|eot_id|>",
    "x<|eot_id|>y", " <|eot_id|> ", "<|eot_id", "<|eot_id|", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_247|>", "<|reserved_special_token_248|>", "<<s>>",
    "<|<|eot_id|>|>", "<s><s><s>", "\u0000", "a\u0000b", "\u0000\u0000", "\x07bell", "\x1b[31mred\x1b[0m",
    "\ufffd", "\ue000\uf8ff", "\U000f0000", "\U0010fffd", "\ufdd0", "\uffff", "\u0378", "\U000e0001",
    "\u200d", "a\u200db", "\u200e\u200f", "\ufeffBOM", "\u00ad", "a" * 300, " " * 200, "\n" * 50,
    "ab" * 150, "12" * 100, "😀" * 40, "é" * 100, "\t" * 30 + "x", "a " * 100, "- " * 50 + "\n",
]
for w in WHITESPACE + NOT_WHITESPACE:
    HAND += ["a" + w + "b", w * 3, "a " + w + "b", w + "\n", "!" + w + "!", " " + w + " x"]


def random_text():
    pools = [
        (30, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        (8, "0123456789"),
        (10, " "),
        (6, "\n\t\r"),
        (8, "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
        (5, "àáâäçèéêëìíîïñòóôöùúûüýÿßøåæœ"),
        (4, "中文字日本語한국어"),
        (3, "😀👍🏽🇫🇷❤️✨"),
        (3, "".join(WHITESPACE + NOT_WHITESPACE)),
        (2, "\u0301\u0308\u20dd\u200d"),
        (2, "▁"),
        (3, None),  # any BMP character
        (1, "astral"),
    ]
    total = sum(w for w, _ in pools)
    out = []
    for _ in range(rng.randint(1, 32)):
        r = rng.uniform(0, total)
        for w, p in pools:
            r -= w
            if r <= 0:
                break
        if p is None:
            c = rng.randint(0x20, 0xFFFD)
            while 0xD800 <= c <= 0xDFFF:
                c = rng.randint(0x20, 0xFFFD)
            out.append(chr(c))
        elif p == "astral":
            out.append(chr(rng.randint(0x10000, 0x10FFFD)))
        else:
            out.append(rng.choice(p))
    if rng.random() < 0.15:
        specials = ["<s>", "</s>", "<unk>", "<|eot_id|>", "<|begin_of_text|>", "<|user|>"]
        k = rng.randint(0, len(out))
        out.insert(k, rng.choice(specials))
    return "".join(out)


def real_snippets(n):
    docs = []
    for r in json.load(open(os.path.join(SHARED, "datasets/codealpaca/code_alpaca_2k.json"))):
        docs.append(r["instruction"] + "\n" + r["input"] + "\n" + r["output"])
    for line in open(os.path.join(SHARED, "datasets/flan_v2/cot_data/gsm8k_train.tsv"), encoding="utf-8"):
        docs.append(line.replace("\\n", "\n"))
    out = []
    for _ in range(n):
        d = rng.choice(docs)
        a = rng.randint(0, max(0, len(d) - 1))
        out.append(d[a:a + rng.randint(10, 250)])
    return out


def case(tok, text, full=True):
    c = {"text": text}
    if "\x00" in text:
        c["hex"] = text.encode("utf-8").hex()
    ids = tok.encode(text, add_special_tokens=False).ids
    ids_s = tok.encode(text, add_special_tokens=True).ids
    c["ids"] = ids
    c["ids_special"] = ids_s
    c["decoded"] = tok.decode(ids, skip_special_tokens=False)
    if full:
        c["decoded_skip"] = tok.decode(ids_s, skip_special_tokens=True)
        if "<" in text:
            tok.encode_special_tokens = True
            c["ids_nosplit"] = tok.encode(text, add_special_tokens=False).ids
            tok.encode_special_tokens = False
    return c


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print("%s: %d lines, %d bytes" % (path, len(rows), os.path.getsize(path)))


def stress(name):
    tok = Tokenizer.from_file(os.path.join(SHARED, "tokenizers", name, "tokenizer.json"))
    texts = list(dict.fromkeys(HAND)) + [random_text() for _ in range(90)] + real_snippets(20)
    write_jsonl(os.path.join(OUT, name + "_stress.jsonl"), [case(tok, t) for t in texts])


def train_bytelevel():
    docs = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"]
            for r in json.load(open(os.path.join(SHARED, "datasets/codealpaca/code_alpaca_2k.json")))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    d = json.loads(tok.to_str())
    d["added_tokens"] = [
        {"id": 600, "content": "<|bos|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True},
        {"id": 601, "content": "<|eos|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True},
    ]
    d["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|eos|>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [600], "tokens": ["<|bos|>"]},
                                              "<|eos|>": {"id": "<|eos|>", "ids": [601], "tokens": ["<|eos|>"]}}}
    d["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path = os.path.join(OUT, "bytelevel_base.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False, separators=(",", ":"))
    print("%s: %d bytes" % (path, os.path.getsize(path)))
    return d


L3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
            "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def added(id_, content, **kw):
    a = {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False}
    a.update(kw)
    return a


def variants(bl):
    base = {"stories260K": json.load(open(os.path.join(SHARED, "models/stories260K/hf/tokenizer.json"))),
            "bytelevel": bl}
    s_added = base["stories260K"]["added_tokens"]
    sp_vocab = dict(base["stories260K"]["model"]["vocab"])
    texts = ["Once upon a time", " Once upon a time ", "the cat sat on the mat.", "Hello <s> world</s>",
             "x <|user|> y", "x<|user|>y", "  <|user|>  hi", "hello there", "say hello!", "ahello hellob hello",
             "[SEP]after", "before [SEP]  after", "a <mask>", "a   <mask> b", "<mask><mask>", "ünïcödé ok",
             "日本語 text", "tab\there", "new\nline", "  two  spaces  ", "", " ", "end.", "a\u2581b", "▁▁x",
             "zzz qqq", "I'm don't", "12345 6789", "😀 emoji", "mixed <s>and</s> tokens", "<unk>", "héllo wörld",
             "a ab abc", "ab", "x ab y", "\u3000full\u3000width", "<|user|><|user|>", "hello<|user|>hello"]
    texts += [random_text() for _ in range(2)]
    out = []

    def var(name, b, patch, extra_texts=(), model_patch=None, vocab_drop=(), merges_as_strings=False):
        d = json.loads(json.dumps(base[b]))
        d.update(patch)
        d["model"].update(model_patch or {})
        for k in vocab_drop:
            del d["model"]["vocab"][k]
        if merges_as_strings:
            d["model"]["merges"] = [" ".join(p) for p in d["model"]["merges"]]
        tok = Tokenizer.from_str(json.dumps(d))
        cases = [case(tok, t, full=False) for t in list(texts) + list(extra_texts)]
        v = {"name": name, "base": b, "patch": patch}
        if model_patch:
            v["model_patch"] = model_patch
        if vocab_drop:
            v["vocab_drop"] = list(vocab_drop)
        if merges_as_strings:
            v["merges_as_strings"] = True
        v["cases"] = cases
        out.append(v)

    opts_added = s_added + [
        added(512, "<|user|>", lstrip=True, rstrip=True),
        added(513, "hello", single_word=True, normalized=True),
        added(514, "[SEP]", special=True, rstrip=True),
        added(515, "<mask>", special=True, lstrip=True),
        added(516, "ab", normalized=True),
    ]
    var("added_options", "stories260K", {"added_tokens": opts_added})
    var("metaspace_first", "stories260K", {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}})
    var("metaspace_always_split", "stories260K", {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}})
    var("metaspace_never", "stories260K", {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True},
        "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never", "split": True}})
    var("unk_fused", "stories260K", {}, model_patch={"byte_fallback": False})
    var("unk_not_fused", "stories260K", {}, model_patch={"byte_fallback": False, "fuse_unk": False})
    # Byte fallback with some <0xXX> tokens missing: some characters fall back, some become unk.
    var("partial_fallback", "stories260K", {}, ["€x€", "é€é", "日€本", "€€ab"],
        vocab_drop=[k for k in sp_vocab if k.startswith("<0x8") or k.startswith("<0xE")])
    for beh in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]:
        for inv in ([False, True] if beh in ("Removed", "Contiguous") else [False]):
            var("split_%s%s" % (beh, "_invert" if inv else ""), "stories260K", {
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Strip", "strip_left": True, "strip_right": False},
                    {"type": "Prepend", "prepend": "\u2581"},
                    {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
                "pre_tokenizer": {"type": "Split", "pattern": {"String": "\u2581"}, "behavior": beh, "invert": inv}})
    var("bytelevel_gpt2_prefix", "bytelevel", {
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}})
    var("bytelevel_gpt2", "bytelevel", {})
    var("bytelevel_llama3_regex", "bytelevel", {
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": L3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}},
        model_patch={"ignore_merges": True})
    var("bytelevel_string_merges", "bytelevel", {}, merges_as_strings=True)
    var("no_decoder", "stories260K", {"decoder": None})
    write_jsonl(os.path.join(OUT, "variants.jsonl"), out)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    stress("llama2")
    stress("llama3")
    variants(train_bytelevel())
