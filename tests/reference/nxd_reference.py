#!/usr/bin/env python3
"""An independent model of NxD's Llama checkpoint converter, written from `nxd-sharding-rules.md`.

What it models: `examples/training/llama/convert_checkpoints.py --convert_from_full_state` of
aws-neuron/neuronx-distributed @ fbac349 (Release 2.29), i.e. `CheckpointConverterBase`, with torch 2.15, including
where that converter crashes and where it is silently wrong. `--reverse` (alias `--convert_to_full_state`) models the
merge back to one full state dict. It models what NxD DOES, not what would be right.

Forward CLI (booleans are flags; like NxD, a flag followed by ANY value, even `0` or `False`, means on):

    python nxd_reference.py --input_dir <full_state.pt | HF safetensors dir> --output_dir OUT --config config.json \
        --tp_size N --pp_size N [--virtual_pp_size N] [--kv_size_multiplier N] [--qkv_linear] [--fuse_qkv] \
        [--hw_backend trn1|trn2] [--coalesce_qkv] [--save_xser]

writes OUT/model/dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt (torch.save of a plain dict), in NxD's order
(tp outer, pp inner), and crashes (uncaught exception, exit status 1) where NxD crashes, after writing the files NxD
would have written before its crash.

Reverse CLI: the same flags plus `--reverse` (or `--convert_to_full_state`), `--input_dir` = the `model/` directory
of shard files; writes OUT/checkpoint.pt.

Importable API (no global state; nothing here reads /work/shared):
    Options                                   the converter's settings (a frozen dataclass); Options.cli_args()
    ModelShape, MODELS                        the spec's reference model shapes (a, b, c, d) and ModelShape.from_config
    load_full_state(path, config=None)        the full state dict NxD would torch.load (HF dirs rebuilt in HF order)
    stage_layers(layer_ids, stages)           the pipeline cut: list of layer-id lists per stage (AssertionError)
    layer_pp_ranks(layer_ids, pp, vpp)        {layer id: pp rank}
    q_heads_for_rank(shape, opts, tp_rank)    q head indices (in order) that a tp rank gets with --qkv_linear
    kv_rows_for_rank(rows, opts, tp_rank)     k/v source rows (in order) that a tp rank gets with --qkv_linear
    iter_shards(full_state, config, opts)     yields ((tp, pp, ep), dict) in NxD's order (lazy; may raise)
    convert_from_full_state(full_state, config, opts) -> {(tp, pp): dict}   (ep_size 1)
    shard_filename(opts, tp, pp, ep=0)        "dp_rank_00_tp_rank_TT_pp_rank_PP.pt"
    write_shards(input_path, output_dir, config_path, opts) -> [paths]
    merge_to_full_state(load_shard, config, opts) -> dict   (reverse; load_shard(tp, pp, ep) -> dict)
    expected_outcome(model, opts) -> "ok" | "crash"                from the spec's §11 rules, not from this code
    expected_error(model, opts) -> None | (exception type name, message prefix)
    expected_round_trip(model, opts) -> None | "exact" | "differs" | "crash"   (§12-§14 rules)
    iter_configs(model, ...) -> yields (Options, outcome)
    iter_all_configs(...) -> yields (model name, Options, outcome)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Options",
    "ModelShape",
    "MODELS",
    "load_full_state",
    "hf_key_order",
    "stage_layers",
    "layer_pp_ranks",
    "q_heads_for_rank",
    "kv_rows_for_rank",
    "iter_shards",
    "convert_shard",
    "convert_from_full_state",
    "shard_filename",
    "write_shards",
    "merge_to_full_state",
    "load_shard_file",
    "expected_outcome",
    "expected_error",
    "expected_round_trip",
    "iter_configs",
    "iter_all_configs",
    "main",
]


# ----------------------------------------------------------------------------------------------------------------
# Settings and model shapes


@dataclass(frozen=True)
class Options:
    """The converter's command-line settings (NxD names)."""

    tp_size: int = 1
    pp_size: int = 1
    virtual_pp_size: int = 1
    kv_size_multiplier: int = 1
    qkv_linear: bool = False
    fuse_qkv: bool = False
    hw_backend: str = "trn1"
    coalesce_qkv: bool = False
    save_xser: bool = False
    load_xser: bool = False
    ep_size: int = 1
    pad_attn_heads: bool = False
    i_tp_round_factor: int = 0

    @property
    def trn2(self) -> bool:
        # Anything but the exact string "trn2" takes the trn1 path (e.g. "inf2").
        return self.hw_backend == "trn2"

    def replace(self, **kw) -> "Options":
        return dataclasses.replace(self, **kw)

    def cli_args(self, nxd_style: bool = False) -> List[str]:
        """The flags for this script (or, with nxd_style, for NxD's convert_checkpoints.py: `--flag 1`)."""
        a = [
            "--tp_size", str(self.tp_size),
            "--pp_size", str(self.pp_size),
            "--virtual_pp_size", str(self.virtual_pp_size),
            "--kv_size_multiplier", str(self.kv_size_multiplier),
            "--hw_backend", self.hw_backend,
        ]
        if self.ep_size != 1:
            a += ["--ep_size", str(self.ep_size)]
        if self.i_tp_round_factor:
            a += ["--i_tp_round_factor", str(self.i_tp_round_factor)]
        for flag in ("qkv_linear", "fuse_qkv", "coalesce_qkv", "save_xser", "load_xser", "pad_attn_heads"):
            if getattr(self, flag):
                a += [f"--{flag}", "1"] if nxd_style else [f"--{flag}"]
        return a

    def short(self) -> str:
        s = f"tp{self.tp_size}_pp{self.pp_size}_vpp{self.virtual_pp_size}_kvm{self.kv_size_multiplier}_{self.hw_backend}"
        for flag, tag in (("qkv_linear", "ql"), ("fuse_qkv", "fuse"), ("coalesce_qkv", "coal"), ("save_xser", "xser")):
            if getattr(self, flag):
                s += "_" + tag
        return s


@dataclass(frozen=True)
class ModelShape:
    """The config facts the converter uses (plus what the reference models need to be rebuilt)."""

    q_heads: int
    kv_heads: int
    hidden: int
    layers: int
    intermediate: int = 512
    vocab: int = 1024
    tied: bool = False
    inv_freq: bool = False

    @property
    def head_dim(self) -> int:
        # NxD uses hidden_size // num_attention_heads, never config.head_dim.
        return self.hidden // self.q_heads

    @property
    def is_gqa(self) -> bool:
        return self.q_heads != self.kv_heads

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        return cls(
            q_heads=int(config["num_attention_heads"]),
            kv_heads=int(config.get("num_key_value_heads", config["num_attention_heads"])),
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            intermediate=int(config.get("intermediate_size", 0)),
            vocab=int(config.get("vocab_size", 0)),
            tied=bool(config.get("tie_word_embeddings", False)),
        )


# The spec's §1 reference models.
MODELS: "OrderedDict[str, ModelShape]" = OrderedDict(
    [
        ("a_gqa_llama3", ModelShape(q_heads=8, kv_heads=2, hidden=256, layers=6)),
        ("b_mha_llama2", ModelShape(q_heads=8, kv_heads=8, hidden=256, layers=5)),
        ("c_gqa_7l_tied", ModelShape(q_heads=8, kv_heads=4, hidden=256, layers=7, tied=True)),
        ("d_a_plus_inv_freq", ModelShape(q_heads=8, kv_heads=2, hidden=256, layers=6, inv_freq=True)),
    ]
)


def _shape(model) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return ModelShape.from_config(model)
    if model in MODELS:
        return MODELS[model]
    for name, s in MODELS.items():  # "a", "b", "c", "d", "a_gqa", ...
        if name.startswith(model):
            return s
    raise KeyError(f"unknown model {model!r}")


# ----------------------------------------------------------------------------------------------------------------
# Loading the full state dict


# Per-layer HF state-dict order (LlamaDecoderLayer registration order). `self_attn.rotary_emb` is where
# transformers <= 4.30 registered the persistent inv_freq buffer: right after o_proj.
_LAYER_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.rotary_emb",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
]
_PARAM_ORDER = ["weight", "bias", "inv_freq"]
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def hf_key_order(keys: Sequence[str]) -> List[str]:
    """Sorts keys into LlamaForCausalLM.state_dict() order; unknown keys keep their relative order (after the known
    keys of their layer, or at the very end for non-layer keys)."""
    pos = {k: i for i, k in enumerate(keys)}

    def rank(k: str):
        if k.startswith("model.embed_tokens."):
            return (0, 0, 0, _param_rank(k), pos[k])
        m = _LAYER_RE.match(k)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            mod, _, param = rest.rpartition(".")
            mi = _LAYER_MODULES.index(mod) if mod in _LAYER_MODULES else len(_LAYER_MODULES)
            pi = _PARAM_ORDER.index(param) if param in _PARAM_ORDER else len(_PARAM_ORDER)
            return (1, layer, mi, pi, pos[k])
        if k.startswith("model.norm."):
            return (2, 0, 0, _param_rank(k), pos[k])
        if k.startswith("lm_head."):
            return (3, 0, 0, _param_rank(k), pos[k])
        return (4, 0, 0, 0, pos[k])

    return sorted(keys, key=rank)


def _param_rank(k: str) -> int:
    p = k.rsplit(".", 1)[-1]
    return _PARAM_ORDER.index(p) if p in _PARAM_ORDER else len(_PARAM_ORDER)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself if it already owns a storage of exactly its size, else a compact copy (safetensors may hand out views
    of one big mapped buffer, which torch.save would write out whole)."""
    nbytes = t.numel() * t.element_size()
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _read_hf_dir(path: str) -> "OrderedDict[str, torch.Tensor]":
    from safetensors import safe_open

    idx = os.path.join(path, "model.safetensors.index.json")
    files: List[str] = []
    if os.path.exists(idx):
        with open(idx, "r", encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
        for fn in wm.values():
            if fn not in files:
                files.append(fn)
        files.sort()
        st = True
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files, st = ["model.safetensors"], True
    else:
        bidx = os.path.join(path, "pytorch_model.bin.index.json")
        if os.path.exists(bidx):
            with open(bidx, "r", encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
            files = ["pytorch_model.bin"]
        else:
            raise FileNotFoundError(f"no model.safetensors[.index.json] or pytorch_model.bin in {path}")
        st = False
    raw: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for fn in files:
        fp = os.path.join(path, fn)
        if st:
            with safe_open(fp, framework="pt", device="cpu") as f:
                for k in f.keys():
                    raw[k] = _own_storage(f.get_tensor(k))
        else:
            for k, v in torch.load(fp, map_location="cpu").items():
                raw[k] = v
    return raw


def load_full_state(input_path: str, config: Optional[dict] = None) -> "OrderedDict[str, torch.Tensor]":
    """The dict NxD's converter would iterate over.

    * a file: `torch.load(path, map_location="cpu")`, order and tensor objects as stored (like NxD);
    * an HF directory (sharded or single safetensors, or pytorch_model*.bin): the tensors rebuilt in
      `model.state_dict()` order; when the embeddings are tied (config `tie_word_embeddings`) and `lm_head.weight`
      is absent, `lm_head.weight` is added in its slot as the SAME tensor object as `model.embed_tokens.weight`
      (what `torch.save(model.state_dict())` of a tied model gives).
    """
    if not os.path.isdir(input_path):
        return torch.load(input_path, map_location="cpu")
    raw = _read_hf_dir(input_path)
    if config is None:
        cfg_path = os.path.join(input_path, "config.json")
        config = json.load(open(cfg_path, "r", encoding="utf-8")) if os.path.exists(cfg_path) else {}
    if "lm_head.weight" not in raw and "model.embed_tokens.weight" in raw:
        if config.get("tie_word_embeddings", False):
            raw["lm_head.weight"] = raw["model.embed_tokens.weight"]
        else:
            print("nxd_reference: warning: lm_head.weight absent and embeddings not tied", file=sys.stderr)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k in hf_key_order(list(raw)):
        out[k] = raw[k]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pipeline placement (§4)


def stage_layers(layer_ids: Sequence[int], stages: int) -> List[List[int]]:
    """Splits the sorted layer ids into `stages` consecutive groups: floor(L/S) each, the remainder one each to the
    LAST stages. Fewer layers than stages is NxD's create_partitions AssertionError."""
    ids = sorted(layer_ids)
    n = len(ids)
    base = n // stages
    if base < 1:
        raise AssertionError(
            "The partition cannot be created; num_hidden_layers should be atleast equal to         "
            f"pipeline_parallel_size, but found num_hidden_layers = {n} and pipeline_parallel_size = {stages}"
        )
    extra = n % stages
    sizes = [base + (1 if s >= stages - extra else 0) for s in range(stages)]
    out, at = [], 0
    for sz in sizes:
        out.append(ids[at:at + sz])
        at += sz
    return out


def layer_pp_ranks(layer_ids: Sequence[int], pp: int, vpp: int = 1) -> Dict[int, int]:
    """{layer id: pp rank}; stage s (of pp*vpp) lives on pp rank s % pp."""
    return {l: s % pp for s, group in enumerate(stage_layers(layer_ids, pp * vpp)) for l in group}


def _layer_ids(state: Dict[str, torch.Tensor]) -> List[int]:
    ids = set()
    for k in state:
        m = re.match(r"^model\.layers\.(\d+)", k)
        if m:
            ids.add(int(m.group(1)))
    return sorted(ids)


def _pp_rank_of_layer(layer_idx: int, groups: List[List[int]], pp: int) -> int:
    # A key's layer goes to the first stage whose last layer id is >= it (else the last stage); this also places
    # ids that are not among the layer ids (NxD compares against the cut's layer id).
    for s, g in enumerate(groups[:-1]):
        if layer_idx <= g[-1]:
            return s % pp
    return (len(groups) - 1) % pp


# ----------------------------------------------------------------------------------------------------------------
# Head selection with --qkv_linear (§6)


def _head_view(full: torch.Tensor, q_heads: int, head_dim: int) -> torch.Tensor:
    """full viewed as [q_heads, head_dim, X] (a q_proj, or a transposed o_proj)."""
    numel = full.numel()
    if q_heads * head_dim == 0 or numel % (q_heads * head_dim) != 0:
        raise RuntimeError(f"shape '[{q_heads}, {head_dim}, -1]' is invalid for input of size {numel}")
    return full.reshape(q_heads, head_dim, numel // (q_heads * head_dim))


def _trn1_blocks(q_heads: int, kv_heads: int, head_dim: int, x: int, opts: Options) -> Tuple[int, List[int]]:
    """trn1: (heads per block n, block index for each position p of the rank list). The Q heads are cut into
    blocks of n = Q // (KV*kvm) consecutive heads; position p = i*KV + j (i < tp//KV, j < KV) holds block
    (j*tp)//KV + i, so tp rank r gets block (r % KV)*(tp/KV) + r // KV. Raises what NxD raises."""
    numel = q_heads * head_dim * x
    padded_q = q_heads
    if opts.pad_attn_heads:
        padded_q = -(-q_heads // opts.tp_size) * opts.tp_size
        if padded_q != q_heads:
            raise NotImplementedError("--pad_attn_heads with Q not divisible by tp is not modelled")
    n = padded_q // (kv_heads * opts.kv_size_multiplier)
    if n == 0 or q_heads % n != 0:
        raise RuntimeError(f"shape '[-1, {n}, {head_dim}, {x}]' is invalid for input of size {numel}")
    nblocks = q_heads // n
    # Without pad, NxD spreads by tp; with pad it spreads by the number of blocks (identical when tp == blocks).
    spread = nblocks if opts.pad_attn_heads else opts.tp_size
    positions: List[int] = []
    for i in range(spread // kv_heads):
        idx = [(j * spread) // kv_heads + i for j in range(kv_heads)]
        bad = [b for b in idx if b >= nblocks]
        if bad:
            raise IndexError(f"index {bad[0]} is out of bounds for dimension 0 with size {nblocks}")
        positions.extend(idx)
    if not positions:
        raise ValueError("torch.cat(): expected a non-empty list of Tensors")
    return n, positions


def q_heads_for_rank(shape, opts: Options, tp_rank: int, x: Optional[int] = None) -> List[int]:
    """The q head indices, in order, that tp rank `tp_rank` receives for weight_q (and for o_proj's columns) with
    --qkv_linear. Raises the exception NxD raises for that setting (ValueError/IndexError/RuntimeError)."""
    s = _shape(shape)
    q, kv, hd = s.q_heads, s.kv_heads, s.head_dim
    x = s.hidden if x is None else x
    if opts.trn2:
        if q % kv != 0:
            raise RuntimeError(f"shape '[{kv}, {q // kv}, {hd}, {x}]' is invalid for input of size {q * hd * x}")
        per = q // opts.tp_size  # pad_attn_heads with Q % tp == 0 is identical
        if opts.pad_attn_heads and q % opts.tp_size:
            raise NotImplementedError("--pad_attn_heads with Q not divisible by tp is not modelled")
        if per == 0:
            raise RuntimeError(
                f"cannot reshape tensor of 0 elements into shape [-1, {x}] because the unspecified dimension size "
                "-1 can be any value and is ambiguous"
            )
        return list(range(tp_rank * per, (tp_rank + 1) * per))
    n, positions = _trn1_blocks(q, kv, hd, x, opts)
    if tp_rank >= len(positions):
        raise IndexError(f"index {tp_rank} is out of bounds for dimension 0 with size {len(positions)}")
    b = positions[tp_rank]
    return list(range(b * n, (b + 1) * n))


def kv_rows_for_rank(rows: int, opts: Options, tp_rank: int) -> List[int]:
    """k/v with --qkv_linear: the full tensor tiled kvm times (rows 0..R-1, 0..R-1, ...), then rank r takes the r-th
    of tp equal row chunks. Returns the source row indices."""
    total = rows * opts.kv_size_multiplier
    if total % opts.tp_size != 0:
        raise AssertionError("0th dim after KV replication is not divisible by tp_size")
    part = total // opts.tp_size
    return [(tp_rank * part + t) % rows for t in range(part)]


# ----------------------------------------------------------------------------------------------------------------
# Forward conversion (§2-§7)


def _is_qkv(name: str) -> bool:
    return any(t in name for t in ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value"))


def _split_dim(name: str) -> int:
    if "embed_tokens" in name or "lm_head" in name or "wte" in name:
        return 0
    if _is_qkv(name):
        return 0
    if "gate_proj" in name or "up_proj" in name or "gate_up_proj" in name:
        return 0
    if "down_proj" in name:
        return 1
    if "o_proj" in name:
        return 1
    raise AssertionError(f"Unknown partition_dim for {name}")


_QKV_LINEAR_NAMES = {"q_proj.weight": "qkv_proj.weight_q", "k_proj.weight": "qkv_proj.weight_k",
                     "v_proj.weight": "qkv_proj.weight_v"}


def _rename_to_nxd(name: str, opts: Options) -> str:
    """q/k/v key names with --qkv_linear; any other qkv-like key is NxD's KeyError."""
    if not _is_qkv(name):
        return name
    head, tail = name.rsplit(".", 2)[0], ".".join(name.split(".")[-2:])
    return head + "." + _QKV_LINEAR_NAMES[tail]


def _tp_chunk(t: torch.Tensor, dim: int, tp: int, r: int) -> torch.Tensor:
    size = t.size(dim)
    if size % tp != 0:
        raise AssertionError("vocab size is not divisiable")
    part = size // tp
    return t.narrow(dim, r * part, part).clone()


def _coalesce(full_state: "OrderedDict[str, torch.Tensor]", config: dict, tp: int) -> "OrderedDict":
    """--coalesce_qkv: per layer (config num_hidden_layers), q/k/v are removed and qkv_proj.weight =
    cat over ranks of [q_r; k_r; v_r] (hidden//tp rows each) is appended at the END of the dict."""
    state = OrderedDict(full_state)
    hidden = int(config["hidden_size"])
    part = hidden // tp
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}.self_attn."
        q, k, v = state.pop(p + "q_proj.weight"), state.pop(p + "k_proj.weight"), state.pop(p + "v_proj.weight")
        pieces = []
        for r in range(tp):
            for t in (q, k, v):
                if r * part + part > t.size(0):
                    raise RuntimeError(f"start ({r * part}) + length ({part}) exceeds dimension size ({t.size(0)}).")
                pieces.append(t.narrow(0, r * part, part).clone())
        state[p + "qkv_proj.weight"] = torch.cat(pieces, 0)
    return state


def _pp_filter(name: str, pp_rank: int, opts: Options, groups: List[List[int]]) -> bool:
    """True when `name` belongs on pp rank `pp_rank` (ep rank 0)."""
    if pp_rank != 0 and ("embed_tokens" in name or "wte" in name):
        return False
    last = opts.pp_size - 1
    if pp_rank != last and ("lm_head" in name or "model.norm.weight" in name or "norm_f.weight" in name):
        return False
    if "layers" in name:
        layer = int(name.split(".")[2])
        if _pp_rank_of_layer(layer, groups, opts.pp_size) != pp_rank:
            return False
    return True


def _plan(full_state, opts: Options, groups: List[List[int]]) -> List[tuple]:
    """Per key, once per conversion: (name, tensor, pp ranks it goes to, kind). Kinds: "ql" (q/k/v/o with
    --qkv_linear), "split" (dim-0/1 tp chunks), "gateup", "expert", "repl" (replicated object)."""
    plan = []
    for name, full in full_state.items():
        pps = frozenset(p for p in range(opts.pp_size) if _pp_filter(name, p, opts, groups))
        if "expert_mlps" in name:
            kind = "expert"
        elif opts.qkv_linear and (_is_qkv(name) or "o_proj" in name):
            kind = "ql"
        elif ("embed_tokens" in name or _is_qkv(name) or "o_proj" in name or "down_proj" in name
              or "lm_head" in name or "wte" in name):
            kind = "split"
        elif "gate_proj" in name or "up_proj" in name:
            kind = "gateup"
        else:
            kind = "repl"
        plan.append((name, full, pps, kind))
    return plan


def convert_shard(full_state, config: dict, opts: Options, tp_rank: int, pp_rank: int, ep_rank: int = 0,
                  groups: Optional[List[List[int]]] = None, plan: Optional[List[tuple]] = None
                  ) -> Dict[str, torch.Tensor]:
    """One output file's dict. `full_state` must already be coalesced if opts.coalesce_qkv (iter_shards does it)."""
    if plan is None:
        if groups is None:
            groups = stage_layers(_layer_ids(full_state), opts.pp_size * opts.virtual_pp_size)
        plan = _plan(full_state, opts, groups)
    q_heads = int(config["num_attention_heads"])
    kv_heads = int(config["num_key_value_heads"])
    hidden = int(config["hidden_size"])
    head_dim = hidden // q_heads
    shape = ModelShape(q_heads=q_heads, kv_heads=kv_heads, hidden=hidden, layers=0)
    tp = opts.tp_size
    out: Dict[str, torch.Tensor] = {}  # a plain dict, like NxD's partial_state (it is what gets pickled)
    for name, full, pps, kind in plan:
        if pp_rank not in pps:
            continue
        if ep_rank != 0 and kind != "expert":
            continue
        if kind == "expert":
            raise NotImplementedError("expert (MoE) weights are not modelled")

        if kind == "ql":
            name = _rename_to_nxd(name, opts)
            if "weight_k" in name or "weight_v" in name:
                rows = kv_rows_for_rank(full.size(0), opts, tp_rank)
                # the tiled rows of rank r are consecutive modulo the source: one gather, own storage
                out[name] = full.index_select(0, torch.tensor(rows, dtype=torch.long)).clone()
            else:
                is_o = "o_proj" in name
                src = full.transpose(0, 1) if is_o else full
                heads3 = _head_view(src, q_heads, head_dim)  # [Q, hd, X]
                sel = q_heads_for_rank(shape, opts, tp_rank, x=heads3.size(2))
                if sel == list(range(sel[0], sel[0] + len(sel))):
                    picked = heads3.narrow(0, sel[0], len(sel))
                else:
                    picked = heads3.index_select(0, torch.tensor(sel, dtype=torch.long))
                # row-major [n*hd, X] (NxD builds it from a concatenated copy)
                picked = picked.reshape(-1, heads3.size(2)).contiguous()
                # o_proj: back to [H, n*hd] as a transposed view; clone() keeps its strides (1, H)
                out[name] = (picked.transpose(0, 1) if is_o else picked).clone()
        elif kind == "split":
            dim = _split_dim(name)
            chunk = _tp_chunk(full, dim, tp, tp_rank)
            if "down_proj" in name and opts.i_tp_round_factor > 0:
                config["ffn_config"]  # KeyError for Llama configs, as in NxD
                raise NotImplementedError("--i_tp_round_factor is not modelled")
            out[name] = chunk
        elif kind == "gateup":
            chunk = _tp_chunk(full, 0, tp, tp_rank)
            if opts.i_tp_round_factor > 0:
                raise AssertionError()  # NxD asserts a 3-D (MoE) layout here
            is_gate = "gate_proj" in name
            fused = name.replace("gate_proj" if is_gate else "up_proj", "gate_up_proj")
            if fused in out:
                out[fused] = torch.cat([chunk, out[fused]] if is_gate else [out[fused], chunk], 0).clone()
            else:
                out[fused] = chunk
            out.pop(name, None)
        else:
            out[name] = full  # replicated: the very tensor object that was loaded

    if opts.fuse_qkv:
        suffix = "qkv_proj.weight_q"
        layers = [int(m) for m in re.findall(rf"model\.layers\.(\d+)\.self_attn\.{re.escape(suffix)}", " ".join(out))]
        for i in layers:
            p = f"model.layers.{i}.self_attn.qkv_proj."
            q, k, v = out.pop(p + "weight_q"), out.pop(p + "weight_k"), out.pop(p + "weight_v")
            out[p + "weight_qkv"] = torch.cat([q, k, v], 0)
    return out


def iter_shards(full_state, config: dict, opts: Options) -> Iterator[Tuple[Tuple[int, int, int], Dict[str, torch.Tensor]]]:
    """Yields ((tp, pp, ep), dict) in NxD's order (tp outer, then pp, then ep). Errors surface lazily, at the same
    point of the sequence as in NxD (so the shards yielded before an error are the files NxD writes before it)."""
    groups = stage_layers(_layer_ids(full_state), opts.pp_size * opts.virtual_pp_size)
    state = _coalesce(full_state, config, opts.tp_size) if opts.coalesce_qkv else full_state
    plan = _plan(state, opts, groups)
    for tp_rank in range(opts.tp_size):
        for pp_rank in range(opts.pp_size):
            for ep_rank in range(opts.ep_size):
                yield (tp_rank, pp_rank, ep_rank), convert_shard(state, config, opts, tp_rank, pp_rank, ep_rank,
                                                                 plan=plan)


def convert_from_full_state(full_state, config: dict, opts: Options) -> Dict[Tuple[int, int], Dict[str, torch.Tensor]]:
    """All shards in memory, {(tp, pp): dict} (ep rank 0 only). Raises like NxD."""
    return {(t, p): sd for (t, p, e), sd in iter_shards(full_state, config, opts) if e == 0}


def shard_filename(opts: Options, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> str:
    if opts.ep_size > 1:
        return f"dp_rank_00_ep_rank_{ep_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"
    return f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def _save(obj, path: str, xser: bool) -> None:
    if xser:
        # torch_xla xser.save with CPU tensors: the same pickle with inline tensors, plus an EMPTY <path>.tensors/
        tdir = path + ".tensors"
        if os.path.isdir(tdir):
            shutil.rmtree(tdir)
        os.mkdir(tdir)
    torch.save(obj, path)


def write_shards(input_path: str, output_dir: str, config_path: str, opts: Options) -> List[str]:
    """The forward conversion end to end, writing files as NxD does (each as soon as it is built)."""
    with open(config_path, "r", encoding="utf-8") as f:
        config = json.load(f)
    full_state = load_full_state(input_path, config)
    written = []
    for (t, p, e), sd in iter_shards(full_state, config, opts):
        path = os.path.join(output_dir, "model", shard_filename(opts, t, p, e))
        os.makedirs(os.path.join(output_dir, "model"), exist_ok=True)
        print(f"Saving to {path}")
        _save(sd, path, opts.save_xser)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Reverse conversion (§12, §13): --convert_to_full_state


_QKV_LINEAR_BACK = {v: k for k, v in _QKV_LINEAR_NAMES.items()}


def _rename_to_hf(name: str, opts: Options, is_gqa: bool) -> str:
    if not _is_qkv(name):
        return name
    if opts.qkv_linear:
        back = _QKV_LINEAR_BACK
    elif is_gqa:
        back = {"q_proj.weight": "q_proj.weight", "k_proj.weight": "k_proj.weight", "v_proj.weight": "v_proj.weight"}
    else:
        # NxD's inverted map of three keys onto one collapses to its last entry
        back = {"qkv_proj.weight": "v_proj.weight"}
    head, tail = name.rsplit(".", 2)[0], ".".join(name.split(".")[-2:])
    return head + "." + back[tail]


def _unfuse(state: dict, opts: Options) -> dict:
    """weight_qkv -> three EQUAL parts (size // 3 each), appended at the end as weight_q/_k/_v."""
    pat = re.compile(r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight_qkv")
    found = [(k, int(m.group(1))) for k in state for m in [pat.match(k)] if m]
    if found and not opts.qkv_linear:
        raise StopIteration  # NxD looks up a "weight_q" key name that does not exist without qkv_linear
    for key, i in found:
        t = state.pop(key)
        n = t.size(0)
        s = int(n / 3)
        if 3 * s != n:
            raise RuntimeError(
                f"split_with_sizes expects split_sizes to sum exactly to {n} (input tensor's size at dimension 0), "
                f"but got split_sizes=[{s}, {s}, {s}]"
            )
        p = f"model.layers.{i}.self_attn.qkv_proj."
        state[p + "weight_q"] = t.narrow(0, 0, s)
        state[p + "weight_k"] = t.narrow(0, s, s)
        state[p + "weight_v"] = t.narrow(0, 2 * s, s)
    return state


def _unpermute_q(full: torch.Tensor, is_o: bool, q_heads: int, kv_heads: int, head_dim: int,
                 opts: Options) -> torch.Tensor:
    """Merge of weight_q / o_proj after concatenating the tp shards: undo the trn1 head permutation (trn2: none)."""
    src = full.transpose(0, 1) if is_o else full
    h3 = _head_view(src, q_heads, head_dim)
    x = h3.size(2)
    if opts.trn2:
        if q_heads % kv_heads != 0:
            raise RuntimeError(f"shape '[{kv_heads}, {q_heads // kv_heads}, {head_dim}, {x}]' is invalid")
        merged = h3.reshape(-1, x)
    else:
        n = q_heads // (kv_heads * opts.kv_size_multiplier)
        if n == 0 or q_heads % n != 0:
            raise RuntimeError(f"shape '[-1, {n}, {head_dim}, {x}]' is invalid for input of size {h3.numel()}")
        blocks = h3.reshape(q_heads // n, n, head_dim, x)
        per = opts.tp_size // kv_heads
        parts = []
        for j in range(kv_heads):
            idx = [t * kv_heads + j for t in range(per)]
            bad = [b for b in idx if b >= blocks.size(0)]
            if bad:
                raise IndexError(f"index {bad[0]} is out of bounds for dimension 0 with size {blocks.size(0)}")
            if not idx:
                raise RuntimeError(
                    f"cannot reshape tensor of 0 elements into shape [-1, {x}] because the unspecified dimension "
                    "size -1 can be any value and is ambiguous")
            parts.append(blocks[idx].reshape(-1, x))
        merged = torch.cat(parts, 0)
    return (merged.transpose(0, 1) if is_o else merged).clone()


def merge_to_full_state(load_shard: Callable[[int, int, int], dict], config: dict,
                        opts: Options) -> Dict[str, torch.Tensor]:
    """--convert_to_full_state: reads shards (tp outer, pp, ep inner) and merges them as NxD does, including its
    crashes (MHA without coalesce: KeyError 'q_proj.weight'; fused qkv whose size is not 3x equal parts:
    split_with_sizes) and its silent errors (fused qkv split into three equal parts, heads dropped by trn1)."""
    q_heads = int(config["num_attention_heads"])
    kv_heads = int(config["num_key_value_heads"])
    hidden = int(config["hidden_size"])
    head_dim = hidden // q_heads
    is_gqa = q_heads != kv_heads
    tp = opts.tp_size
    if opts.ep_size > 1:
        raise IndexError("list index out of range")  # NxD's merge of ep>1 output (§11)
    full: dict = {}  # a plain dict, like NxD's full_state

    def collect(key: str, piece: torch.Tensor):
        lst = full.setdefault(key, [])
        lst.append(piece)
        return lst

    for tp_rank in range(tp):
        last_tp = tp_rank == tp - 1
        for pp_rank in range(opts.pp_size):
            for ep_rank in range(opts.ep_size):
                state = load_shard(tp_rank, pp_rank, ep_rank)
                if "model" in state:
                    state = state["model"]
                state = dict(state)
                if opts.fuse_qkv:
                    state = _unfuse(state, opts)
                for name, param in state.items():
                    if opts.qkv_linear and (_is_qkv(name) or "o_proj" in name):
                        dim = _split_dim(name)
                        hf = _rename_to_hf(name, opts, is_gqa)
                        lst = collect(hf, param)
                        if not last_tp:
                            continue
                        cat = torch.cat(lst, dim)
                        if "k" in hf or "v" in hf:
                            # the kv replicas are assumed identical: keep the first of kvm chunks
                            full[hf] = torch.chunk(cat, opts.kv_size_multiplier)[0].clone()
                        else:
                            full[hf] = _unpermute_q(cat, "o_proj" in hf, q_heads, kv_heads, head_dim, opts)
                    elif "qkv_proj" in name and not is_gqa:
                        part = hidden // tp
                        pieces = torch.split(param, part, 0)
                        if len(pieces) != 3:
                            raise ValueError(f"too many values to unpack (expected 3)" if len(pieces) > 3
                                             else f"not enough values to unpack (expected 3, got {len(pieces)})")
                        for tag, t in zip("qkv", pieces):
                            key = name.replace("qkv", tag)
                            lst = collect(key, t)
                            if last_tp:
                                full[key] = torch.cat(lst, 0).clone()
                    elif "embed_tokens" in name or _is_qkv(name) or "o_proj" in name or "lm_head" in name:
                        dim = _split_dim(name)
                        hf = _rename_to_hf(name, opts, is_gqa)
                        lst = collect(hf, param)
                        if last_tp:
                            full[hf] = torch.cat(lst, dim).clone()
                    elif "down_proj" in name:
                        lst = collect(name, param)
                        if last_tp:
                            full[name] = torch.cat(lst, 1)
                    elif "gate_up_proj" in name:
                        half = param.size(0) // 2
                        g = collect(name.replace("gate_up_proj", "gate_proj"), param.narrow(0, 0, half).clone())
                        u = collect(name.replace("gate_up_proj", "up_proj"), param.narrow(0, half, half).clone())
                        if last_tp:
                            full[name.replace("gate_up_proj", "gate_proj")] = torch.cat(g, 0)
                            full[name.replace("gate_up_proj", "up_proj")] = torch.cat(u, 0)
                    elif "expert_mlps" in name:
                        raise NotImplementedError("expert (MoE) weights are not modelled")
                    else:
                        if name not in full:
                            full[name] = param
    return full


def _shard_path(input_dir: str, tp_rank: int, pp_rank: int, ep_rank: int, xser: bool) -> str:
    v1 = os.path.join(input_dir, f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}")
    if not xser:
        v1 = os.path.join(v1, "checkpoint.pt")
    v2 = os.path.join(input_dir, f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt")
    v3 = os.path.join(input_dir, f"dp_rank_00_ep_rank_{ep_rank:02d}_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt")
    for p in (v1, v2, v3):
        if os.path.exists(p):
            return p
    raise RuntimeError(f"Error: neither {v1}, nor {v2}, nor {v3} exist")


def load_shard_file(input_dir: str, tp_rank: int, pp_rank: int, ep_rank: int = 0, load_xser: bool = False) -> dict:
    path = _shard_path(input_dir, tp_rank, pp_rank, ep_rank, load_xser)
    if load_xser:
        if not os.path.isabs(path):
            # NxD joins the relative prefix in front of the already-relative file name (§10)
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{path}' (relative --input_dir with "
                                    "--load_xser)")
        return torch.load(path, map_location="cpu", weights_only=False)
    return torch.load(path)


def write_full_state(input_dir: str, output_dir: str, config_path: str, opts: Options) -> str:
    with open(config_path, "r", encoding="utf-8") as f:
        config = json.load(f)
    full = merge_to_full_state(lambda t, p, e: load_shard_file(input_dir, t, p, e, opts.load_xser), config, opts)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "checkpoint.pt")
    print(f"Saving full checkpoint to {path}")
    torch.save(full, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Expected outcomes, from the spec's rules (§11, §12, §14) -- deliberately NOT computed by running the code above


def _q_path_error(s: ModelShape, opts: Options) -> Optional[Tuple[str, str]]:
    """The error NxD's q / o_proj head selection raises with --qkv_linear (§6, §11), or None."""
    q, kv, hd, tp, kvm = s.q_heads, s.kv_heads, s.head_dim, opts.tp_size, opts.kv_size_multiplier
    if opts.trn2:
        if q // tp == 0:
            return ("RuntimeError", "cannot reshape tensor of 0 elements")
        return None
    # trn1: accepted iff KV <= tp <= KV*kvm and KV*kvm <= Q (power-of-two sizes)
    if kv * kvm > q:
        return ("RuntimeError", f"shape '[-1, 0, {hd}, {s.hidden}]' is invalid")
    if tp < kv:
        return ("ValueError", "torch.cat(): expected a non-empty list of Tensors")
    if tp > kv * kvm:
        nblocks = kv * kvm
        first_bad = next(j * tp // kv for j in range(kv) if j * tp // kv >= nblocks)
        return ("IndexError", f"index {first_bad} is out of bounds for dimension 0 with size {nblocks}")
    return None


def expected_error(model, opts: Options) -> Optional[Tuple[str, str]]:
    """None when NxD accepts `opts` for `model`, else (exception type name, message prefix) of its crash."""
    s = _shape(model)
    hd, tp, kvm = s.head_dim, opts.tp_size, opts.kv_size_multiplier
    if opts.pp_size * opts.virtual_pp_size > s.layers:
        return ("AssertionError", "The partition cannot be created")
    if opts.coalesce_qkv:
        if s.kv_heads * hd < (s.hidden // tp) * tp:
            # GQA: k/v have fewer rows than the hidden//tp-row pieces cut from them
            return ("RuntimeError", "start (")
        if opts.qkv_linear:
            # q/k/v are gone; the first layer key is o_proj (head selection), then qkv_proj.weight has no
            # qkv_linear name
            return _q_path_error(s, opts) or ("KeyError", "'qkv_proj.weight'")
    if opts.qkv_linear:
        err = _q_path_error(s, opts)  # q_proj comes before k_proj
        if err:
            return err
        if (s.kv_heads * hd * kvm) % tp:
            return ("AssertionError", "0th dim after KV replication")
    if opts.i_tp_round_factor > 0:
        return ("AssertionError", "")
    return None


def expected_outcome(model, opts: Options) -> str:
    """'ok' or 'crash' for NxD's forward conversion (§11)."""
    return "ok" if expected_error(model, opts) is None else "crash"


def expected_round_trip(model, opts: Options) -> Optional[str]:
    """§12-§14: after an accepted forward conversion, what --convert_to_full_state with the same flags gives:
    'exact' (bit-exact), 'differs' or 'crash'. None when the forward conversion itself crashes."""
    s = _shape(model)
    if expected_error(s, opts) is not None:
        return None
    if opts.ep_size > 1:
        return "crash"
    if not opts.qkv_linear:
        if not s.is_gqa and not opts.coalesce_qkv:
            return "crash"  # KeyError: 'q_proj.weight'
        return "exact"
    q, kv, hd, tp, kvm = s.q_heads, s.kv_heads, s.head_dim, opts.tp_size, opts.kv_size_multiplier
    unfused = "exact" if (opts.trn2 or tp == kv * kvm) else "differs"
    if not opts.fuse_qkv:
        return unfused
    q_rows = (q // tp) * hd if opts.trn2 else (q // (kv * kvm)) * hd
    k_rows = kv * kvm * hd // tp
    total = q_rows + 2 * k_rows
    if total % 3:
        return "crash"  # split_with_sizes
    if q_rows != k_rows:
        return "differs"  # wrong shapes
    return unfused


# The matrix axes of §14 (plus coalesce and a few extra cases).
TP_SIZES = (1, 2, 4, 8)
PP_SIZES = (1, 2, 3)
VPP_SIZES = (1, 2)
KVMS = (1, 2, 4)
HWS = ("trn1", "trn2")


def iter_configs(model, *, coalesce: bool = True, extra: bool = True, xser: bool = False,
                 tp_sizes=TP_SIZES, pp_sizes=PP_SIZES, vpp_sizes=VPP_SIZES, kvms=KVMS,
                 hws=HWS) -> Iterator[Tuple[Options, str]]:
    """Yields (Options, 'ok'|'crash') over the §14 matrix tp{1,2,4,8} x pp{1,2,3} x vpp{1,2} x qkv_linear{0,1} x
    kvm{1,2,4} x fuse{0,1} x hw{trn1,trn2} for `model` (a MODELS name, a prefix such as "a", a ModelShape or a
    config dict). With coalesce: also every tp x qkv_linear x hw at pp{1,2} with --coalesce_qkv (kvm 1, no fuse).
    With extra: tp2 at pp4..pp8 (placement / create_partitions) and hw "inf2" (the trn1 path). With xser: every
    config also with --save_xser (the outcome does not change). The outcome comes from expected_outcome(), i.e.
    from the spec's rules, not from running the conversion."""
    s = _shape(model)
    seen = set()

    def emit(o: Options):
        for x in ((False, True) if xser else (False,)):
            oo = o.replace(save_xser=x)
            if oo not in seen:
                seen.add(oo)
                yield oo, expected_outcome(s, oo)

    for tp in tp_sizes:
        for pp in pp_sizes:
            for vpp in vpp_sizes:
                for ql in (False, True):
                    for kvm in kvms:
                        for fuse in (False, True):
                            for hw in hws:
                                yield from emit(Options(tp_size=tp, pp_size=pp, virtual_pp_size=vpp,
                                                        kv_size_multiplier=kvm, qkv_linear=ql, fuse_qkv=fuse,
                                                        hw_backend=hw))
    if coalesce:
        for tp in tp_sizes:
            for pp in (1, 2):
                for ql in (False, True):
                    for hw in hws:
                        yield from emit(Options(tp_size=tp, pp_size=pp, qkv_linear=ql, hw_backend=hw,
                                                coalesce_qkv=True))
    if extra:
        for pp, vpp in ((4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1)):
            yield from emit(Options(tp_size=2, pp_size=pp, virtual_pp_size=vpp))
        for tp, kvm in ((2, 1), (8, 4), (4, 2)):
            yield from emit(Options(tp_size=tp, kv_size_multiplier=kvm, qkv_linear=True, hw_backend="inf2"))


def iter_all_configs(models: Sequence[str] = ("a_gqa_llama3", "b_mha_llama2", "c_gqa_7l_tied"),
                     **kw) -> Iterator[Tuple[str, Options, str]]:
    """(model name, Options, outcome) for every model of `models`."""
    for m in models:
        for o, out in iter_configs(m, **kw):
            yield m, o, out


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_dir", required=True,
                   help="forward: full_state.pt (torch.save(model.state_dict())) or an HF model dir; "
                        "reverse: the directory holding the dp_rank_*.pt files")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--config", required=True, help="HF config.json")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--virtual_pp_size", type=int, default=1)
    p.add_argument("--ep_size", type=int, default=1)
    p.add_argument("--kv_size_multiplier", type=int, default=1)
    p.add_argument("--hw_backend", default="trn1")
    p.add_argument("--i_tp_round_factor", type=int, default=0)
    for flag in ("qkv_linear", "fuse_qkv", "coalesce_qkv", "save_xser", "load_xser", "pad_attn_heads"):
        # store_true; an optional value is accepted and, as with NxD's type=bool, any value means on
        p.add_argument(f"--{flag}", nargs="?", const="1", default=None)
    p.add_argument("--convert_from_full_state", action="store_true", help="forward (the default)")
    p.add_argument("--convert_to_full_state", "--reverse", dest="reverse", action="store_true",
                   help="reverse: merge the shards back into OUT/checkpoint.pt")
    return p


def options_from_args(a: argparse.Namespace) -> Options:
    return Options(
        tp_size=a.tp_size, pp_size=a.pp_size, virtual_pp_size=a.virtual_pp_size, ep_size=a.ep_size,
        kv_size_multiplier=a.kv_size_multiplier, hw_backend=a.hw_backend, i_tp_round_factor=a.i_tp_round_factor,
        qkv_linear=a.qkv_linear is not None, fuse_qkv=a.fuse_qkv is not None,
        coalesce_qkv=a.coalesce_qkv is not None, save_xser=a.save_xser is not None,
        load_xser=a.load_xser is not None, pad_attn_heads=a.pad_attn_heads is not None,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)  # as in the spec's runs; no effect on the output
    if a.reverse and a.convert_from_full_state:
        raise AssertionError("Exactly one '--convert_*' flag must be specified")
    opts = options_from_args(a)
    if a.reverse:
        write_full_state(a.input_dir, a.output_dir, a.config, opts)
    else:
        write_shards(a.input_dir, a.output_dir, a.config, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
