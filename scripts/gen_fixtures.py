#!/usr/bin/env python3
"""Generate tiny (and optionally large) Llama-architecture checkpoints for the tests and benchmarks.

Run with the project's reference venv (created by scripts/setup-python.sh):

    .venv/current/bin/python scripts/gen_fixtures.py OUTDIR [--only NAME ...] [--large-gb X]

Each model is written to OUTDIR/NAME as a Hugging Face directory, exactly as `save_pretrained` writes it:

    model-0000i-of-0000n.safetensors, model.safetensors.index.json, config.json, generation_config.json

plus, for the small models, `full_state.pt` = `torch.save(model.state_dict())` (the single consolidated file that
NxD's `convert_checkpoints.py --convert_from_full_state` takes as `--input_dir`), and a `.complete` stamp.

Small models (random init, torch.manual_seed(1234), cast to bf16, RMSNorm weights re-drawn uniformly in [0.5, 1.5]
so that a misplaced layer is visible; every model is sharded with max_shard_size = total/2, i.e. 3 shards):

    gqa_llama3    hidden 256, 8 heads, 2 kv heads, 6 layers, inter 512, vocab 1024, untied   (57 keys)
    mha_llama2    hidden 256, 8 heads, 8 kv heads, 5 layers, inter 512, vocab 1024, untied   (48 keys)
    gqa_7l_tied   hidden 256, 8 heads, 4 kv heads, 7 layers, inter 512, vocab 1024, tied     (66 keys in the
                  state dict; lm_head.weight shares storage with embed_tokens and is absent from the safetensors)
    gqa_inv_freq  gqa_llama3 (same weights) plus six float32 model.layers.N.self_attn.rotary_emb.inv_freq [16],
                  placed where transformers <= 4.30 put them (right after self_attn.o_proj.weight)      (63 keys)

Large model (only with --large-gb X): gqa_large, 32 heads, 8 kv heads, head_dim 64, hidden 2048, inter 5632,
vocab 32000, untied, layers = the smallest multiple of 8 (>= 8) that reaches X GB (decimal) of bf16. It is written
tensor by tensor (never instantiated), one ~500 MB shard at a time, with the same split, index, config and
safetensors bytes that save_pretrained produces (--check-writer proves this on a small model). It has no
full_state.pt (that would need the whole model in memory). Peak RSS is about 1.4 GB whatever X is (about 0.95 GB
of it is importing torch + transformers).

Idempotent: a model whose directory holds a `.complete` stamp equal to what this run would write is skipped.
Deterministic: the same library versions give byte-identical files on every run.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

# Quiet and deterministic library behaviour; set before importing torch/transformers.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from importlib.metadata import version as dist_version  # noqa: E402
from types import SimpleNamespace  # noqa: E402

# torch/transformers take 10+ s to import: they are imported only when a model really has to be written, so that
# an up-to-date OUTDIR is checked in well under a second.
torch = transformers = split_torch_state_dict_into_shards = save_file = None
GenerationConfig = LlamaConfig = LlamaForCausalLM = None


def load_libs():
    global torch, transformers, split_torch_state_dict_into_shards, save_file
    global GenerationConfig, LlamaConfig, LlamaForCausalLM
    if torch is not None:
        return
    import torch as _torch
    import transformers as _transformers
    from huggingface_hub import split_torch_state_dict_into_shards as _split
    from safetensors.torch import save_file as _save_file

    _transformers.utils.logging.set_verbosity_error()
    _transformers.utils.logging.disable_progress_bar()
    torch, transformers, split_torch_state_dict_into_shards, save_file = _torch, _transformers, _split, _save_file
    GenerationConfig = _transformers.GenerationConfig
    LlamaConfig = _transformers.LlamaConfig
    LlamaForCausalLM = _transformers.LlamaForCausalLM


# Bump whenever the bytes this script writes change for the same library versions.
GENERATOR_VERSION = 1
SEED = 1234

_COMMON = dict(hidden_size=256, num_attention_heads=8, intermediate_size=512, vocab_size=1024)
SMALL_MODELS = OrderedDict(
    [
        ("gqa_llama3", dict(_COMMON, num_key_value_heads=2, num_hidden_layers=6, tie_word_embeddings=False)),
        ("mha_llama2", dict(_COMMON, num_key_value_heads=8, num_hidden_layers=5, tie_word_embeddings=False)),
        ("gqa_7l_tied", dict(_COMMON, num_key_value_heads=4, num_hidden_layers=7, tie_word_embeddings=True)),
        ("gqa_inv_freq", dict(_COMMON, num_key_value_heads=2, num_hidden_layers=6, tie_word_embeddings=False)),
    ]
)
INV_FREQ_MODELS = {"gqa_inv_freq"}

LARGE_NAME = "gqa_large"
LARGE_SHAPE = dict(
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=5632,
    vocab_size=32000,
    tie_word_embeddings=False,
)
LARGE_SHARD_SIZE = "500MB"  # decimal, as huggingface_hub parses it
ALL_NAMES = list(SMALL_MODELS) + [LARGE_NAME]

INDEX_NAME = "model.safetensors.index.json"
STAMP_NAME = ".complete"


def log(msg):
    print(f"gen_fixtures: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def llama_state_dict_specs(cfg):
    """(name, shape) of every tensor of LlamaForCausalLM(cfg).state_dict(), in state-dict order."""
    h = cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    inter = cfg.intermediate_size
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    specs.append(("lm_head.weight", (cfg.vocab_size, h)))
    return specs


def is_norm(name):
    return name.endswith("norm.weight")


def rope_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0))


def legacy_inv_freq(cfg):
    """inv_freq exactly as transformers <= 4.30 LlamaRotaryEmbedding computed it (float32, [head_dim/2])."""
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = rope_theta(cfg)
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


def write_config_files(dirpath, cfg, dtype):
    """config.json + generation_config.json, as PreTrainedModel.save_pretrained writes them."""
    cfg.dtype = str(dtype).split(".")[1]
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(dirpath)
    GenerationConfig.from_model_config(cfg).save_pretrained(dirpath)


def write_sharded_safetensors(dirpath, shapes, get_tensor, max_shard_size, total_parameters, log_shards=False):
    """Write model-XXXXX-of-YYYYY.safetensors + index like save_pretrained, materialising one shard at a time.

    shapes: OrderedDict name -> (shape, dtype) in state-dict order (tied duplicates already removed).
    get_tensor(name) -> contiguous CPU tensor. Returns the list of shard file names.
    """
    meta = OrderedDict((n, torch.empty(s, dtype=dt, device="meta")) for n, (s, dt) in shapes.items())
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    del meta
    files = list(split.filename_to_tensors)
    for k, (fname, names) in enumerate(split.filename_to_tensors.items()):
        shard = {n: get_tensor(n).contiguous() for n in names}
        save_file(shard, os.path.join(dirpath, fname), metadata={"format": "pt"})
        del shard
        if log_shards:
            log(f"  shard {k + 1}/{len(files)} {fname} ({os.path.getsize(os.path.join(dirpath, fname)) / 1e6:.0f} MB)")
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        with open(os.path.join(dirpath, INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def stamp_text(name, spec):
    return (
        json.dumps(
            {
                "generator": "scripts/gen_fixtures.py",
                "generator_version": GENERATOR_VERSION,
                "model": name,
                "spec": spec,
                "seed": SEED,
                "torch": dist_version("torch").split("+")[0],
                "transformers": dist_version("transformers"),
                "safetensors": dist_version("safetensors"),
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )


def is_complete(final_dir, stamp):
    p = os.path.join(final_dir, STAMP_NAME)
    try:
        with open(p, encoding="utf-8") as f:
            return f.read() == stamp
    except OSError:
        return False


def publish(tmp_dir, final_dir, stamp):
    """Write the stamp last, then move the finished directory into place."""
    with open(os.path.join(tmp_dir, STAMP_NAME), "w", encoding="utf-8") as f:
        f.write(stamp)
    if os.path.lexists(final_dir):
        shutil.rmtree(final_dir)
    os.rename(tmp_dir, final_dir)


def make_tmp_dir(outdir, name):
    """OUTDIR/.NAME.tmp-PID; leftovers of killed runs (dead PIDs) are removed first."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(outdir):
        if entry.startswith(prefix) and entry[len(prefix):].isdigit():
            pid = int(entry[len(prefix):])
            try:
                os.kill(pid, 0)
                alive = pid != os.getpid()
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                shutil.rmtree(os.path.join(outdir, entry), ignore_errors=True)
    path = os.path.join(outdir, prefix + str(os.getpid()))
    os.makedirs(path)
    return path


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


# --------------------------------------------------------------------------------------------------------------
# Small models (real transformers models, save_pretrained)


def build_small_model(spec):
    cfg = LlamaConfig(**spec)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    # Re-draw RMSNorm weights (all ones by default) so that a misplaced layer is visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name):
                p.copy_(torch.rand(p.shape, dtype=torch.float32) + 0.5)
    return model


def with_legacy_inv_freq(model):
    """state_dict() plus model.layers.N.self_attn.rotary_emb.inv_freq, in the position old transformers had it.

    transformers <= 4.30 registered `rotary_emb` (persistent inv_freq buffer) in LlamaAttention.__init__ right
    after o_proj, so each layer's keys were q, k, v, o, rotary_emb.inv_freq, mlp.*, the two layernorms.
    """
    sd = model.state_dict()
    inv = legacy_inv_freq(model.config)
    out = OrderedDict()
    for k, v in sd.items():
        out[k] = v
        if k.endswith(".self_attn.o_proj.weight"):
            out[k[: -len("o_proj.weight")] + "rotary_emb.inv_freq"] = inv.clone()
    # torch.save pickles the OrderedDict's _metadata too; give the new submodules their entries like a real
    # old model would have had.
    md = OrderedDict()
    for k, v in getattr(sd, "_metadata", {}).items():
        md[k] = v
        if k.endswith(".self_attn.o_proj"):
            md[k[: -len("o_proj")] + "rotary_emb"] = {"version": 1}
    out._metadata = md
    return out


def gen_small(name, outdir, force):
    spec = SMALL_MODELS[name]
    full_spec = dict(spec, legacy_inv_freq=name in INV_FREQ_MODELS, dtype="bfloat16",
                     norm_init="uniform[0.5,1.5]", max_shard_size="total_size//2")
    stamp = stamp_text(name, full_spec)
    final_dir = os.path.join(outdir, name)
    if not force and is_complete(final_dir, stamp):
        return "skipped", final_dir
    t0 = time.time()
    load_libs()
    model = build_small_model(spec)
    if name in INV_FREQ_MODELS:
        state = with_legacy_inv_freq(model)
    else:
        state = model.state_dict()
    # total_size counts unique storages, as huggingface_hub does; half of it gives 3 shards for these models.
    seen, total = set(), 0
    for t in state.values():
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    tmp_dir = make_tmp_dir(outdir, name)
    try:
        if name in INV_FREQ_MODELS:
            model.save_pretrained(tmp_dir, state_dict=OrderedDict(state), max_shard_size=total // 2)
        else:
            model.save_pretrained(tmp_dir, max_shard_size=total // 2)
        check_saved_keys(tmp_dir, state, model)
        # Named full_state.pt from the start: torch.save derives the zip's top folder from the file name.
        torch.save(state, os.path.join(tmp_dir, "full_state.pt"))
        publish(tmp_dir, final_dir, stamp)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    n_shards = len([f for f in os.listdir(final_dir) if f.endswith(".safetensors")])
    log(f"{name}: {len(state)} state-dict keys, {n_shards} shards, {dir_bytes(final_dir) / 1e6:.2f} MB "
        f"({time.time() - t0:.1f}s)")
    return "written", final_dir


def check_saved_keys(d, state, model):
    """The safetensors must hold every state-dict key except tied duplicates (save_pretrained would drop others)."""
    with open(os.path.join(d, INDEX_NAME), encoding="utf-8") as f:
        saved = set(json.load(f)["weight_map"])
    expected = set(state)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if saved != expected:
        raise SystemExit(f"gen_fixtures: save_pretrained saved {sorted(saved ^ expected)} unexpectedly")


# --------------------------------------------------------------------------------------------------------------
# Large model (streamed, never instantiated)


def large_layers_for(gb):
    specs = llama_state_dict_specs(SimpleNamespace(num_hidden_layers=1, **LARGE_SHAPE))
    fixed = sum(math.prod(s) for n, s in specs if not n.startswith("model.layers.")) * 2
    per_layer = sum(math.prod(s) for n, s in specs if n.startswith("model.layers.0.")) * 2
    layers = max(8, 8 * math.ceil(max(0.0, gb * 1e9 - fixed) / (8 * per_layer)))
    return layers


class LargeTensorSource:
    """Deterministic values per tensor: normal(0, 0.02) like transformers' init, norms uniform [0.5, 1.5].

    Each tensor has its own generator seeded from its state-dict position, and is filled in fixed row chunks, so
    the values do not depend on how tensors are grouped into shards.
    """

    CHUNK_ELEMS = 1 << 22  # 4M float32 temporaries (16 MB)

    def __init__(self, specs, std):
        self.shapes = dict(specs)
        self.position = {n: i for i, (n, _) in enumerate(specs)}
        self.std = std

    def __call__(self, name):
        shape = self.shapes[name]
        g = torch.Generator().manual_seed(SEED * 1_000_003 + self.position[name])
        out = torch.empty(shape, dtype=torch.bfloat16)
        if is_norm(name):
            out.copy_(torch.rand(shape, generator=g, dtype=torch.float32) + 0.5)
            return out
        rows, cols = shape
        step = max(1, self.CHUNK_ELEMS // cols)
        for r in range(0, rows, step):
            r1 = min(rows, r + step)
            out[r:r1].copy_(torch.randn((r1 - r, cols), generator=g, dtype=torch.float32).mul_(self.std))
        return out


def gen_large(gb, outdir, force, shard_size=LARGE_SHARD_SIZE):
    layers = large_layers_for(gb)
    spec = dict(LARGE_SHAPE, num_hidden_layers=layers)
    full_spec = dict(spec, dtype="bfloat16", max_shard_size=shard_size,
                     init="per-tensor normal(0,0.02), norms uniform[0.5,1.5]")
    stamp = stamp_text(LARGE_NAME, full_spec)
    final_dir = os.path.join(outdir, LARGE_NAME)
    if not force and is_complete(final_dir, stamp):
        return "skipped", final_dir
    t0 = time.time()
    load_libs()
    cfg = LlamaConfig(**spec)
    specs = llama_state_dict_specs(cfg)
    shapes = OrderedDict((n, (s, torch.bfloat16)) for n, s in specs)
    total_params = sum(math.prod(s) for _, s in specs)
    log(f"{LARGE_NAME}: {layers} layers, {total_params * 2 / 1e9:.3f} GB bf16, shards of <= {shard_size}")
    tmp_dir = make_tmp_dir(outdir, LARGE_NAME)
    try:
        write_config_files(tmp_dir, cfg, torch.bfloat16)
        source = LargeTensorSource(specs, std=cfg.initializer_range)
        files = write_sharded_safetensors(tmp_dir, shapes, source, shard_size, total_params, log_shards=True)
        publish(tmp_dir, final_dir, stamp)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"{LARGE_NAME}: {len(specs)} tensors, {len(files)} shards, {dir_bytes(final_dir) / 1e9:.3f} GB "
        f"({time.time() - t0:.1f}s)")
    return "written", final_dir


# --------------------------------------------------------------------------------------------------------------
# Self-check: the streaming writer reproduces save_pretrained byte for byte


def sha256_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def check_writer():
    """Save a real model with save_pretrained and with the streaming writer (same tensors); compare every file."""
    load_libs()
    ok = True
    for spec in (
        dict(_COMMON, num_key_value_heads=2, num_hidden_layers=6, tie_word_embeddings=False),
        dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=352,
             vocab_size=320, num_hidden_layers=8, tie_word_embeddings=False),
    ):
        model = build_small_model(spec)
        sd = model.state_dict()
        total = sum(t.numel() * t.element_size() for t in sd.values())
        for max_shard in (total // 2, total // 5):
            with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
                model.save_pretrained(a, max_shard_size=max_shard)
                cfg = LlamaConfig(**spec)
                specs = llama_state_dict_specs(cfg)
                if [n for n, _ in specs] != list(sd) or any(tuple(sd[n].shape) != s for n, s in specs):
                    log("check-writer: llama_state_dict_specs differs from LlamaForCausalLM.state_dict()")
                    ok = False
                shapes = OrderedDict((n, (tuple(t.shape), t.dtype)) for n, t in sd.items())
                write_config_files(b, cfg, torch.bfloat16)
                write_sharded_safetensors(b, shapes, lambda n: sd[n], max_shard, model.num_parameters())
                fa, fb = sorted(os.listdir(a)), sorted(os.listdir(b))
                same = fa == fb and all(sha256_file(os.path.join(a, f)) == sha256_file(os.path.join(b, f)) for f in fa)
                log(f"check-writer: layers={spec['num_hidden_layers']} max_shard_size={max_shard}: "
                    f"{len(fa)} files {'IDENTICAL' if same else 'DIFFERENT'}")
                if not same:
                    ok = False
                    for f in sorted(set(fa) | set(fb)):
                        ha = sha256_file(os.path.join(a, f)) if f in fa else None
                        hb = sha256_file(os.path.join(b, f)) if f in fb else None
                        if ha != hb:
                            log(f"  differs: {f}")
    return ok


# --------------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="directory that receives one sub-directory per model")
    ap.add_argument("--only", nargs="+", action="extend", metavar="NAME", choices=ALL_NAMES,
                    help=f"generate only these models ({', '.join(ALL_NAMES)})")
    ap.add_argument("--large-gb", type=float, metavar="X",
                    help=f"also write {LARGE_NAME}, a bf16 Llama of about X GB (decimal; layers a multiple of 8)")
    ap.add_argument("--large-shard-size", default=LARGE_SHARD_SIZE, metavar="SIZE",
                    help=f"max_shard_size for {LARGE_NAME} (default {LARGE_SHARD_SIZE})")
    ap.add_argument("--force", action="store_true", help="regenerate even when the .complete stamp matches")
    ap.add_argument("--check-writer", action="store_true",
                    help="verify that the streaming writer used for the large model matches save_pretrained "
                         "byte for byte, then exit")
    args = ap.parse_args(argv)

    if args.check_writer:
        ok = check_writer()
        print(f"gen_fixtures: check-writer {'passed' if ok else 'FAILED'}: streaming writer vs save_pretrained")
        return 0 if ok else 1

    if args.outdir is None:
        ap.error("OUTDIR is required")
    names = list(dict.fromkeys(args.only)) if args.only else list(SMALL_MODELS) + (
        [LARGE_NAME] if args.large_gb is not None else [])
    if LARGE_NAME in names and args.large_gb is None:
        ap.error(f"{LARGE_NAME} needs --large-gb X")
    if args.large_gb is not None and args.large_gb <= 0:
        ap.error("--large-gb must be positive")

    os.makedirs(args.outdir, exist_ok=True)
    outdir = os.path.abspath(args.outdir)
    t0 = time.time()
    written, skipped = [], []
    for name in names:
        if name == LARGE_NAME:
            status, _ = gen_large(args.large_gb, outdir, args.force, args.large_shard_size)
        else:
            status, _ = gen_small(name, outdir, args.force)
        (written if status == "written" else skipped).append(name)
        if status == "skipped":
            log(f"{name}: up to date (stamp matches), skipped")
    print(f"gen_fixtures: wrote {len(written)} model(s) [{', '.join(written) or '-'}], "
          f"skipped {len(skipped)} up to date [{', '.join(skipped) or '-'}] in {outdir} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
