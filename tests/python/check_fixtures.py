#!/usr/bin/env python3
"""Check generated fixtures with the real Python consumers (run with .venv/current/bin/python).

    check_fixtures.py [--models DIR] [--tokenizer DIR] [--corpus FILE ...]

--models DIR     every model directory written by scripts/gen_fixtures.py in DIR: loads it with
                 AutoModelForCausalLM.from_pretrained (no missing keys, bf16, finite logits) and with safetensors
                 (index == shards, total_size, "format": "pt"), >= 2 shards, RMSNorm weights in [0.5, 1.5],
                 key counts and order, and full_state.pt (torch.load weights_only) == the safetensors tensors,
                 tied lm_head sharing storage, legacy inv_freq position and values.
--tokenizer DIR  AutoTokenizer on DIR (scripts/fetch-tokenizer.sh): class, no BOS added, known ids.
--corpus FILE    a corpus from scripts/make-corpus.py (jsonl/txt/csv/parquet) loads with `datasets`.
Prints one line per item checked and exits non-zero on the first failure.
"""

import argparse
import glob
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fail(msg):
    print(f"check_fixtures: FAIL: {msg}", flush=True)
    sys.exit(1)


def expect(cond, msg):
    if not cond:
        fail(msg)


LAYER_KEYS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]


def expected_keys(n_layers, inv_freq):
    keys = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        for k in LAYER_KEYS:
            keys.append(f"model.layers.{i}.{k}")
            if inv_freq and k == "self_attn.o_proj.weight":
                keys.append(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    return keys + ["model.norm.weight", "lm_head.weight"]


def check_model(d):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    name = os.path.basename(d.rstrip("/"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    n_layers = cfg["num_hidden_layers"]
    tied = cfg.get("tie_word_embeddings", False)
    shards = sorted(glob.glob(os.path.join(d, "model-*-of-*.safetensors")))
    expect(len(shards) >= 2, f"{name}: {len(shards)} shard(s)")
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        expect(f.read() == json.dumps(index, indent=2, sort_keys=True) + "\n", f"{name}: index not in HF format")
    st, where = {}, {}
    for s in shards:
        with safe_open(s, "pt") as f:
            expect(f.metadata() == {"format": "pt"}, f"{name}: {s} metadata {f.metadata()}")
            for k in f.keys():
                st[k] = f.get_tensor(k)
                where[k] = os.path.basename(s)
    expect(where == index["weight_map"], f"{name}: weight_map does not match the shards")
    expect(index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in st.values()),
           f"{name}: total_size")
    has_inv = any(k.endswith("rotary_emb.inv_freq") for k in st)
    exp = expected_keys(n_layers, has_inv)
    exp_st = [k for k in exp if not (tied and k == "lm_head.weight")]
    expect(sorted(st) == sorted(exp_st), f"{name}: safetensors keys {sorted(set(st) ^ set(exp_st))[:5]}")
    for k, t in st.items():
        want = torch.float32 if k.endswith("inv_freq") else torch.bfloat16
        expect(t.dtype == want, f"{name}: {k} is {t.dtype}")
        if k.endswith("norm.weight"):
            lo, hi = t.float().min().item(), t.float().max().item()
            expect(0.5 <= lo and hi <= 1.5 and hi - lo > 0.5, f"{name}: {k} range [{lo}, {hi}]")

    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    expect(not info["missing_keys"], f"{name}: from_pretrained missing {info['missing_keys']}")
    expect(model.dtype == torch.bfloat16, f"{name}: model dtype {model.dtype}")
    msd = model.state_dict()
    for k, t in st.items():
        if k in msd:
            expect(torch.equal(msd[k], t), f"{name}: from_pretrained {k} differs from the safetensors")
    if tied:
        expect(torch.equal(msd["lm_head.weight"], msd["model.embed_tokens.weight"]), f"{name}: lm_head not tied")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    expect(bool(torch.isfinite(logits).all()), f"{name}: non-finite logits")
    what = [f"{len(shards)} shards", f"{len(st)} safetensors keys", "from_pretrained ok"]

    fs_path = os.path.join(d, "full_state.pt")
    if os.path.exists(fs_path):
        fs = torch.load(fs_path, weights_only=True)
        expect(list(fs) == exp, f"{name}: full_state.pt key order")
        for k, t in st.items():
            expect(torch.equal(fs[k], t) and fs[k].dtype == t.dtype, f"{name}: full_state {k} != safetensors")
        if tied:
            expect(fs["lm_head.weight"].untyped_storage().data_ptr()
                   == fs["model.embed_tokens.weight"].untyped_storage().data_ptr(),
                   f"{name}: full_state lm_head does not share storage with embed_tokens")
        if has_inv:
            hd = cfg["hidden_size"] // cfg["num_attention_heads"]
            theta = cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
            ref = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
            for i in range(n_layers):
                expect(torch.equal(fs[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"], ref), f"{name}: inv_freq")
        what.append(f"full_state.pt {len(fs)} keys == safetensors")
    print(f"check_fixtures: ok model {name}: " + ", ".join(what), flush=True)


def check_tokenizer(d):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("The #[unwind] attribute should be used as follows:")["input_ids"]
    expect(ids[:6] == [791, 11765, 359, 19703, 60, 7180], f"tokenizer ids {ids[:6]}")
    expect(tok("")["input_ids"] == [], "tokenizer adds BOS to an empty string")
    expect(tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>", "bos/eos tokens")
    print(f"check_fixtures: ok tokenizer {d}: {type(tok).__name__}, vocab {len(tok)}, no BOS, ids {ids[:6]}",
          flush=True)


def check_corpus(path):
    from datasets import load_dataset

    ext = os.path.splitext(path)[1].lower()
    builder = {".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv", ".parquet": "parquet"}.get(ext)
    expect(builder is not None, f"{path}: unknown corpus extension")
    ds = load_dataset(builder, data_files=path, split="train")
    expect(len(ds) > 0 and "text" in ds.column_names, f"{path}: {len(ds)} rows, columns {ds.column_names}")
    chars = sum(len(t or "") for t in ds["text"])
    print(f"check_fixtures: ok corpus {path}: {builder} loader, {len(ds)} rows, columns {ds.column_names}, "
          f"{chars / 1e6:.2f} M chars", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", metavar="DIR")
    ap.add_argument("--tokenizer", metavar="DIR")
    ap.add_argument("--corpus", nargs="+", default=[], metavar="FILE")
    args = ap.parse_args()
    if not (args.models or args.tokenizer or args.corpus):
        ap.error("nothing to check")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    n = 0
    if args.models:
        dirs = sorted(p for p in glob.glob(os.path.join(args.models, "*"))
                      if os.path.isfile(os.path.join(p, ".complete")))
        expect(dirs, f"no complete model directories in {args.models}")
        for d in dirs:
            check_model(d)
            n += 1
    if args.tokenizer:
        check_tokenizer(args.tokenizer)
        n += 1
    for c in args.corpus:
        check_corpus(c)
        n += 1
    print(f"check_fixtures: all {n} checks passed")


if __name__ == "__main__":
    main()
