#!/usr/bin/env python3
"""The seed tutorial's first step, reproduced for benchmarks: load the HF checkpoint with transformers and write
the whole state dict as one file with torch.save (save-llama3-70B-model.py). The seed forgets torch_dtype and so
writes fp32; `--dtype bfloat16` keeps bf16 (what nx-shard compares against by default)."""
import argparse

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("out")
ap.add_argument("--dtype", default="bfloat16")
a = ap.parse_args()
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
torch.save(model.state_dict(), a.out)
