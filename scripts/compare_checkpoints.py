#!/usr/bin/env python3
"""Compare two Hugging Face safetensors checkpoints tensor by tensor, bit for bit.

    python scripts/compare_checkpoints.py A B

A and B are directories (model.safetensors or an index with shards) or .safetensors files. Exit 0 when both hold
the same tensor names with the same dtypes, shapes and bytes; exit 1 (naming the first differences) otherwise.
Reads through safetensors' memory map, one tensor at a time.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def files_of(path):
    p = Path(path)
    if p.is_file():
        return [p]
    index = p / "model.safetensors.index.json"
    if index.is_file():
        return sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = p / "model.safetensors"
    if single.is_file():
        return [single]
    sys.exit(f"compare_checkpoints: {p} holds no model.safetensors or model.safetensors.index.json")


def tensors(path):
    out = {}
    for f in files_of(path):
        handle = safe_open(str(f), framework="pt")
        for name in handle.keys():
            out[name] = (handle, name)
    return out


def raw_bytes(t):
    """The tensor's bytes (so that NaN payloads and -0.0 count, which == would not)."""
    return t.contiguous().view(-1).view(torch.uint8)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
    problems = [f"only in {sys.argv[1]}: {n}" for n in sorted(a.keys() - b.keys())]
    problems += [f"only in {sys.argv[2]}: {n}" for n in sorted(b.keys() - a.keys())]
    for name in sorted(a.keys() & b.keys()):
        ta, tb = (h.get_tensor(n) for h, n in (a[name], b[name]))
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            problems.append(f"{name}: {ta.dtype} {list(ta.shape)} vs {tb.dtype} {list(tb.shape)}")
        elif not torch.equal(raw_bytes(ta), raw_bytes(tb)):
            problems.append(f"{name}: the bytes differ")
    if problems:
        print("\n".join(problems[:20]), file=sys.stderr)
        sys.exit(1)
    print(f"identical: {len(a)} tensors, bit for bit")


if __name__ == "__main__":
    main()
