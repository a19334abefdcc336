#!/usr/bin/env python3
"""Check data/unicode_tables.c against HF tokenizers' own regex engine, for every code point.

Each code point c (surrogates excepted) is classified by how the Llama 3 pre-tokenizer (Split with its
regex, run by HF tokenizers) splits small probes:
  "a" + c  is one piece      <=>  c is \\p{L}
  "1" + c  is one piece      <=>  c is \\p{N}                  (for c not a letter)
  "!" + c  is two pieces     <=>  c is \\s                     (for c neither; \\r \\n are \\s)
and compared with the L / N / SPACE bits of the committed table. Needs /opt/ref/bin/python (tokenizers);
takes a minute or two. Usage: scripts/check_unicode_classes.py [tokenizer.json]
"""
import re
import sys

from tokenizers import Tokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/tokenizers/llama3/tokenizer.json"
pre = Tokenizer.from_file(path).pre_tokenizer
src = open("data/unicode_tables.c").read()
def array(name):
    body = re.search(r"%s\[\d+\] = \{(.*?)\};" % name, src, re.S).group(1)
    return [int(x) for x in body.replace("\n", "").split(",") if x.strip()]
s1, s2 = array("unicode_stage1"), array("unicode_stage2")
def table(cp):
    return s2[s1[cp >> 7] * 128 + (cp & 127)] & 7

bad = 0
for cp in range(0x110000):
    if 0xD800 <= cp <= 0xDFFF:
        continue
    c = chr(cp)
    if len(pre.pre_tokenize_str("a" + c)) == 1:
        hf = 1
    elif len(pre.pre_tokenize_str("1" + c)) == 1:
        hf = 2
    elif c in "\r\n" or len(pre.pre_tokenize_str("!" + c)) == 2:
        hf = 4
    else:
        hf = 0
    mine = table(cp)
    # A letter or number is never whitespace; compare the class the probes can see.
    mine_c = 1 if mine & 1 else 2 if mine & 2 else 4 if mine & 4 else 0
    if mine_c != hf:
        bad += 1
        if bad <= 20:
            print("U+%04X: table %d, HF %d" % (cp, mine_c, hf))
print("%d code points differ" % bad)
sys.exit(1 if bad else 0)
