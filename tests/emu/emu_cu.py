#!/usr/bin/env python3
"""emu_cu.py IN.cu OUT.cpp: rewrites a CUDA source for the CPU kernel emulator (tests/emu/cuda_emu.h).

Two rewrites, each keeping the line count so that compiler messages point at the original lines:
  kernel<<<grid, block[, smem[, stream]]>>>(args)  ->  emu_launch(kernel, emu_cfg(grid, ...).named("kernel"), args)
  extern __shared__ [__align__(n)] T name[];        ->  T *name = (T *)emu_dyn_smem();
Anything else a C++ compiler cannot take fails to compile, loudly.
"""
import re
import sys

LAUNCH = re.compile(r'([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\((\s*\))?', re.S)
DYN_SMEM = re.compile(r'extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w ]*?)\s+(\w+)\s*\[\s*\]\s*;')


def launch(m):
    kernel, cfg, empty = m.group(1), m.group(2), m.group(3)
    head = 'emu_launch(%s, emu_cfg(%s).named("%s")' % (kernel, cfg, kernel.replace('"', ''))
    return head + (')' if empty else ', ')


def main():
    src, dst = sys.argv[1], sys.argv[2]
    text = open(src).read()
    text = LAUNCH.sub(launch, text)
    text = DYN_SMEM.sub(lambda m: '%s *%s = (%s *)emu_dyn_smem();' % (m.group(1), m.group(2), m.group(1)), text)
    if '<<<' in text or re.search(r'extern\s+__shared__', text):
        sys.exit('%s: a launch or dynamic shared array the emulator rewrite does not understand' % src)
    with open(dst, 'w') as f:
        f.write('#line 1 "%s"\n' % src)
        f.write(text)


if __name__ == '__main__':
    main()
