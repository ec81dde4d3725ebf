"""Self-checks of nxd_reference.py against nxd-sharding-rules.md (§4, §5, §6, §9, §11, §13, §14).

Run:  .venv/current/bin/python -m pytest -q tests/reference
The tiny models are built here with transformers (spec §1 shapes, bf16); q/k/v rows and o_proj columns carry their
own coordinates so that head selection can be checked by value:
    q/k/v row h*hd + d:   [:, 0] = kind (1 q, 2 k, 3 v), [:, 1] = layer, [:, 2] = head, [:, 3] = d
    o_proj col h*hd + d:  [0, :] = 4, [1, :] = layer, [2, :] = head, [3, :] = d
"""

import collections
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nxd_reference as N  # noqa: E402

torch.set_num_threads(1)
HD = 32
Q_KIND, K_KIND, V_KIND, O_KIND = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------------------------------
# Model fixtures


def _build(shape: N.ModelShape, root: Path, name: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = LlamaConfig(hidden_size=shape.hidden, num_attention_heads=shape.q_heads, num_key_value_heads=shape.kv_heads,
                      num_hidden_layers=shape.layers, intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                      tie_word_embeddings=shape.tied)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for kind, lin in ((Q_KIND, layer.self_attn.q_proj), (K_KIND, layer.self_attn.k_proj),
                              (V_KIND, layer.self_attn.v_proj)):
                w = lin.weight
                rows = torch.arange(w.shape[0])
                w[:, 0], w[:, 1], w[:, 2], w[:, 3] = kind, i, rows // HD, rows % HD
            w = layer.self_attn.o_proj.weight
            cols = torch.arange(w.shape[1])
            w[0, :], w[1, :], w[2, :], w[3, :] = O_KIND, i, cols // HD, cols % HD
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    sd = model.state_dict()
    if shape.inv_freq:
        inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2).float() / HD))
        new = collections.OrderedDict()
        for k, v in sd.items():
            new[k] = v
            if k.endswith("self_attn.o_proj.weight"):
                new[k.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv.clone()
        sd = new
    d = root / name
    d.mkdir()
    torch.save(sd, d / "full_state.pt")
    hf = d / "hf"
    if not shape.inv_freq:
        total = sum(t.numel() * t.element_size() for k, t in sd.items() if not (shape.tied and k == "lm_head.weight"))
        model.save_pretrained(hf, max_shard_size=total // 2)
    else:
        hf.mkdir()
        cfg.save_pretrained(hf)
    return dict(shape=shape, sd=torch.load(d / "full_state.pt"), pt=str(d / "full_state.pt"), hf=str(hf),
                config_path=str(hf / "config.json"), config=cfg.to_dict())


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nxd_models")
    return {name[0]: _build(shape, root, name) for name, shape in N.MODELS.items()}


def decode_rows(t):
    """[(kind, layer, head, d)] per row of a q/k/v shard."""
    return [tuple(int(x) for x in r) for r in t[:, :4].float().tolist()]


def heads_of(t, row_major=True):
    """Head indices, in order, of a q/k/v shard (rows) or of an o_proj shard (columns)."""
    v = t[2, :] if not row_major else t[:, 2]
    hs = [int(x) for x in v.float().tolist()]
    return [hs[i] for i in range(0, len(hs), HD)]


def same_tensor(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# §9 per-rank example layout


def _load_dir(out):
    files = sorted(os.listdir(out / "model"))
    return files, {f: torch.load(out / "model" / f) for f in files if f.endswith(".pt")}


def test_section9_layout(models, tmp_path):
    a = models["a"]
    out = tmp_path / "out"
    N.main(["--input_dir", a["pt"], "--output_dir", str(out), "--config", a["config_path"], "--tp_size", "2",
            "--pp_size", "2", "--qkv_linear", "--kv_size_multiplier", "1", "--hw_backend", "trn1"])
    files, sds = _load_dir(out)
    assert files == [f"dp_rank_00_tp_rank_{t:02d}_pp_rank_{p:02d}.pt" for t in range(2) for p in range(2)]
    src = a["sd"]

    def layer_keys(i):
        p = f"model.layers.{i}."
        return [p + "self_attn.qkv_proj.weight_q", p + "self_attn.qkv_proj.weight_k", p + "self_attn.qkv_proj.weight_v",
                p + "self_attn.o_proj.weight", p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight",
                p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]

    for t in range(2):
        s0 = sds[f"dp_rank_00_tp_rank_{t:02d}_pp_rank_00.pt"]
        s1 = sds[f"dp_rank_00_tp_rank_{t:02d}_pp_rank_01.pt"]
        assert type(s0) is dict and type(s1) is dict
        assert list(s0) == ["model.embed_tokens.weight"] + sum((layer_keys(i) for i in range(3)), [])
        assert list(s1) == sum((layer_keys(i) for i in range(3, 6)), []) + ["model.norm.weight", "lm_head.weight"]
        assert same_tensor(s0["model.embed_tokens.weight"], src["model.embed_tokens.weight"][512 * t:512 * (t + 1)])
        assert same_tensor(s1["lm_head.weight"], src["lm_head.weight"][512 * t:512 * (t + 1)])
        assert same_tensor(s1["model.norm.weight"], src["model.norm.weight"])
        for i in range(6):
            sd = s0 if i < 3 else s1
            p, sp = f"model.layers.{i}.", f"model.layers.{i}."
            wq, wk, wv = (sd[p + f"self_attn.qkv_proj.weight_{x}"] for x in "qkv")
            o = sd[p + "self_attn.o_proj.weight"]
            assert wq.shape == (128, 256) and wk.shape == (32, 256) and wv.shape == (32, 256)
            assert same_tensor(wq, src[sp + "self_attn.q_proj.weight"][128 * t:128 * (t + 1)])
            assert heads_of(wq) == [4 * t + h for h in range(4)]
            assert same_tensor(wk, src[sp + "self_attn.k_proj.weight"][32 * t:32 * (t + 1)])
            assert same_tensor(wv, src[sp + "self_attn.v_proj.weight"][32 * t:32 * (t + 1)])
            assert o.shape == (256, 128) and o.stride() == (1, 256) and not o.is_contiguous()
            assert o.untyped_storage().nbytes() == o.numel() * 2
            assert same_tensor(o, src[sp + "self_attn.o_proj.weight"][:, 128 * t:128 * (t + 1)])
            gu = sd[p + "mlp.gate_up_proj.weight"]
            assert gu.shape == (512, 256)
            assert same_tensor(gu, torch.cat([src[sp + "mlp.gate_proj.weight"][256 * t:256 * (t + 1)],
                                              src[sp + "mlp.up_proj.weight"][256 * t:256 * (t + 1)]]))
            dn = sd[p + "mlp.down_proj.weight"]
            assert dn.shape == (256, 256) and dn.is_contiguous()
            assert same_tensor(dn, src[sp + "mlp.down_proj.weight"][:, 256 * t:256 * (t + 1)])
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                assert same_tensor(sd[p + n], src[sp + n])
        for sd in (s0, s1):
            for k, v in sd.items():
                assert v.dtype == torch.bfloat16
                assert v.untyped_storage().nbytes() == v.numel() * 2, k
                if not k.endswith("o_proj.weight"):
                    assert v.is_contiguous(), k
    # the zip's top folder is the file stem
    with zipfile.ZipFile(out / "model" / "dp_rank_00_tp_rank_01_pp_rank_00.pt") as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"dp_rank_00_tp_rank_01_pp_rank_00"}


def test_section9_fuse(models):
    a = models["a"]
    o = N.Options(tp_size=2, pp_size=2, qkv_linear=True, fuse_qkv=True)
    shards = N.convert_from_full_state(a["sd"], a["config"], o)
    for t in range(2):
        for p in range(2):
            sd = shards[(t, p)]
            keys = list(sd)
            assert not any(k.endswith(("weight_q", "weight_k", "weight_v")) for k in keys)
            layers = range(3) if p == 0 else range(3, 6)
            fused = [f"model.layers.{i}.self_attn.qkv_proj.weight_qkv" for i in layers]
            assert keys[-3:] == fused
            if p == 1:
                assert keys[-5:-3] == ["model.norm.weight", "lm_head.weight"]
            for i, k in zip(layers, fused):
                rows = decode_rows(sd[k])
                assert sd[k].shape == (192, 256)
                assert rows[:128] == [(Q_KIND, i, 4 * t + r // HD, r % HD) for r in range(128)]
                assert rows[128:160] == [(K_KIND, i, t, r) for r in range(HD)]
                assert rows[160:] == [(V_KIND, i, t, r) for r in range(HD)]


def test_section9_xser_same_bytes(models, tmp_path):
    a = models["a"]
    base = ["--input_dir", a["pt"], "--config", a["config_path"], "--tp_size", "2", "--pp_size", "2",
            "--qkv_linear"]
    N.main(base + ["--output_dir", str(tmp_path / "plain")])
    N.main(base + ["--output_dir", str(tmp_path / "xser"), "--save_xser", "1"])
    plain = sorted(os.listdir(tmp_path / "plain" / "model"))
    xser = sorted(os.listdir(tmp_path / "xser" / "model"))
    assert xser == sorted(plain + [f + ".tensors" for f in plain])
    for f in plain:
        assert (tmp_path / "plain" / "model" / f).read_bytes() == (tmp_path / "xser" / "model" / f).read_bytes()
        td = tmp_path / "xser" / "model" / (f + ".tensors")
        assert td.is_dir() and os.listdir(td) == []


# ----------------------------------------------------------------------------------------------------------------
# §6 heads per tp rank (model a, layer 0), by value


HEAD_TABLE = {
    # (tp, kvm): {hw: [(q heads, k heads) per rank]}
    (2, 1): {"trn1": [([0, 1, 2, 3], [0]), ([4, 5, 6, 7], [1])],
             "trn2": [([0, 1, 2, 3], [0]), ([4, 5, 6, 7], [1])]},
    (2, 4): {"trn1": [([0], [0, 1, 0, 1]), ([1], [0, 1, 0, 1])],
             "trn2": [([0, 1, 2, 3], [0, 1, 0, 1]), ([4, 5, 6, 7], [0, 1, 0, 1])]},
    (4, 2): {"trn1": [([0, 1], [0]), ([4, 5], [1]), ([2, 3], [0]), ([6, 7], [1])],
             "trn2": [([0, 1], [0]), ([2, 3], [1]), ([4, 5], [0]), ([6, 7], [1])]},
    (8, 4): {"trn1": [([q], [r % 2]) for r, q in enumerate([0, 4, 1, 5, 2, 6, 3, 7])],
             "trn2": [([r], [r % 2]) for r in range(8)]},
}


@pytest.mark.parametrize("tp,kvm,hw", [(tp, kvm, hw) for (tp, kvm) in HEAD_TABLE for hw in ("trn1", "trn2")])
def test_head_table(models, tp, kvm, hw):
    a = models["a"]
    o = N.Options(tp_size=tp, kv_size_multiplier=kvm, qkv_linear=True, hw_backend=hw)
    shards = N.convert_from_full_state(a["sd"], a["config"], o)
    for r, (qh, kh) in enumerate(HEAD_TABLE[(tp, kvm)][hw]):
        sd = shards[(r, 0)]
        p = "model.layers.0.self_attn."
        wq, wk, wv, wo = sd[p + "qkv_proj.weight_q"], sd[p + "qkv_proj.weight_k"], sd[p + "qkv_proj.weight_v"], \
            sd[p + "o_proj.weight"]
        assert heads_of(wq) == qh and heads_of(wo, row_major=False) == qh
        assert decode_rows(wq) == [(Q_KIND, 0, h, d) for h in qh for d in range(HD)]
        assert wo.stride() == (1, 256) and wo.shape == (256, HD * len(qh))
        assert heads_of(wk) == kh and heads_of(wv) == kh
        assert decode_rows(wk) == [(K_KIND, 0, h, d) for h in kh for d in range(HD)]
        assert N.q_heads_for_rank("a", o, r) == qh
        # k rows: kvm tilings of the 64 source rows, chunked
        assert N.kv_rows_for_rank(64, o, r) == [h * HD + d for h in kh for d in range(HD)]


def test_trn1_drops_heads_and_trn2_pairs_wrongly(models):
    a = models["a"]
    # §12.1 a tp8 kvm4 trn2: rank 1 holds Q1 with K1, but Q1 belongs to K0
    o = N.Options(tp_size=8, kv_size_multiplier=4, qkv_linear=True, hw_backend="trn2")
    sd = N.convert_from_full_state(a["sd"], a["config"], o)[(1, 0)]
    assert heads_of(sd["model.layers.0.self_attn.qkv_proj.weight_q"]) == [1]
    assert heads_of(sd["model.layers.0.self_attn.qkv_proj.weight_k"]) == [1]
    # §12.2 a tp2 kvm4 trn1: only Q0 and Q1 survive
    o = N.Options(tp_size=2, kv_size_multiplier=4, qkv_linear=True)
    shards = N.convert_from_full_state(a["sd"], a["config"], o)
    seen = sorted(h for (t, p), sd in shards.items() for h in heads_of(sd["model.layers.0.self_attn.qkv_proj.weight_q"]))
    assert seen == [0, 1]
    # "inf2" is the trn1 path
    o1 = N.Options(tp_size=8, kv_size_multiplier=4, qkv_linear=True, hw_backend="trn1")
    o2 = o1.replace(hw_backend="inf2")
    s1, s2 = (N.convert_from_full_state(a["sd"], a["config"], o) for o in (o1, o2))
    assert all(same_tensor(s1[k][n], s2[k][n]) for k in s1 for n in s1[k])


# ----------------------------------------------------------------------------------------------------------------
# §4 placement


@pytest.mark.parametrize("m,pp,vpp,expect", [
    ("c", 3, 1, [{0, 1}, {2, 3}, {4, 5, 6}]),
    ("c", 3, 2, [{0, 3}, {1, 4}, {2, 5, 6}]),
    ("a", 2, 2, [{0, 2, 3}, {1, 4, 5}]),
    ("b", 2, 2, [{0, 2}, {1, 3, 4}]),
    ("c", 4, 1, [{0}, {1, 2}, {3, 4}, {5, 6}]),
    ("b", 5, 1, [{0}, {1}, {2}, {3}, {4}]),
])
def test_placement(models, m, pp, vpp, expect):
    md = models[m]
    assert [{l for l, r in N.layer_pp_ranks(range(md["shape"].layers), pp, vpp).items() if r == p}
            for p in range(pp)] == expect
    shards = N.convert_from_full_state(md["sd"], md["config"], N.Options(tp_size=2, pp_size=pp, virtual_pp_size=vpp))
    for (t, p), sd in shards.items():
        assert {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")} == expect[p]
        assert ("model.embed_tokens.weight" in sd) == (p == 0)
        assert ("model.norm.weight" in sd) == (p == pp - 1) == ("lm_head.weight" in sd)
        # layers appear in numeric order
        layer_seq = [int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")]
        assert layer_seq == sorted(layer_seq)


# ----------------------------------------------------------------------------------------------------------------
# §5 without qkv_linear, §3 storage


def test_no_qkv_linear_rules(models):
    a = models["a"]
    src = a["sd"]
    base = N.convert_from_full_state(src, a["config"], N.Options(tp_size=4))
    for t in range(4):
        sd = base[(t, 0)]
        p = "model.layers.2."
        assert same_tensor(sd[p + "self_attn.q_proj.weight"], src[p + "self_attn.q_proj.weight"][64 * t:64 * (t + 1)])
        # k/v are not head-aware: 16 rows, half a head
        assert same_tensor(sd[p + "self_attn.k_proj.weight"], src[p + "self_attn.k_proj.weight"][16 * t:16 * (t + 1)])
        assert same_tensor(sd[p + "self_attn.v_proj.weight"], src[p + "self_attn.v_proj.weight"][16 * t:16 * (t + 1)])
        assert same_tensor(sd[p + "self_attn.o_proj.weight"], src[p + "self_attn.o_proj.weight"][:, 64 * t:64 * (t + 1)])
        assert sd[p + "self_attn.o_proj.weight"].is_contiguous()
        assert same_tensor(sd[p + "mlp.gate_up_proj.weight"],
                           torch.cat([src[p + "mlp.gate_proj.weight"][128 * t:128 * (t + 1)],
                                      src[p + "mlp.up_proj.weight"][128 * t:128 * (t + 1)]]))
        assert list(sd)[1:8] == ["model.layers.0.self_attn." + x for x in ("q_proj.weight", "k_proj.weight",
                                                                          "v_proj.weight", "o_proj.weight")] + \
            ["model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.input_layernorm.weight"]
        for k, v in sd.items():
            if "norm" in k:
                assert v is src[k]  # replicated: the loaded object itself
            else:
                assert v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * 2
                assert v.untyped_storage().data_ptr() != src[k if k in src else
                                                             k.replace("gate_up", "gate")].untyped_storage().data_ptr()
    # fuse, hw and kvm have no effect without qkv_linear
    for o in (N.Options(tp_size=4, fuse_qkv=True), N.Options(tp_size=4, hw_backend="trn2", kv_size_multiplier=4)):
        other = N.convert_from_full_state(src, a["config"], o)
        for k in base:
            assert list(other[k]) == list(base[k])
            assert all(same_tensor(other[k][n], base[k][n]) for n in base[k])


def test_coalesce(models):
    b = models["b"]
    src = b["sd"]
    shards = N.convert_from_full_state(src, b["config"], N.Options(tp_size=2, coalesce_qkv=True))
    for t in range(2):
        sd = shards[(t, 0)]
        keys = list(sd)
        # qkv_proj.weight is added at the end of the full dict, so it follows model.norm / lm_head
        assert keys[-5:] == [f"model.layers.{i}.self_attn.qkv_proj.weight" for i in range(5)]
        assert keys[-7:-5] == ["model.norm.weight", "lm_head.weight"]
        assert not any(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for k in keys)
        for i in range(5):
            w = sd[f"model.layers.{i}.self_attn.qkv_proj.weight"]
            p = f"model.layers.{i}.self_attn."
            assert same_tensor(w, torch.cat([src[p + x + "_proj.weight"][128 * t:128 * (t + 1)] for x in "qkv"]))
    with pytest.raises(ValueError, match="expected a non-empty list"):
        N.convert_from_full_state(src, b["config"], N.Options(tp_size=2, coalesce_qkv=True, qkv_linear=True))
    with pytest.raises(RuntimeError):  # GQA: k has 64 rows < hidden
        N.convert_from_full_state(models["a"]["sd"], models["a"]["config"], N.Options(tp_size=2, coalesce_qkv=True))


def test_inv_freq(models):
    d = models["d"]
    src = d["sd"]
    assert list(src)[5] == "model.layers.0.self_attn.rotary_emb.inv_freq"
    for ql in (False, True):
        shards = N.convert_from_full_state(src, d["config"], N.Options(tp_size=2, pp_size=2, qkv_linear=ql))
        for (t, p), sd in shards.items():
            keys = list(sd)
            for i in (range(3) if p == 0 else range(3, 6)):
                k = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
                assert sd[k] is src[k] and sd[k].dtype == torch.float32
                assert keys[keys.index(k) - 1] == f"model.layers.{i}.self_attn.o_proj.weight"


def test_hf_dir_input_matches_state_dict(models):
    for m in ("a", "c"):
        md = models[m]
        hf = N.load_full_state(md["hf"])
        assert list(hf) == list(md["sd"])
        assert all(same_tensor(hf[k], md["sd"][k]) for k in hf)
        if m == "c":
            assert hf["lm_head.weight"] is hf["model.embed_tokens.weight"]
        o = N.Options(tp_size=4, pp_size=2, qkv_linear=True, fuse_qkv=True, kv_size_multiplier=2)
        s1 = N.convert_from_full_state(hf, md["config"], o)
        s2 = N.convert_from_full_state(md["sd"], md["config"], o)
        for k in s1:
            assert list(s1[k]) == list(s2[k])
            assert all(same_tensor(s1[k][n], s2[k][n]) and s1[k][n].stride() == s2[k][n].stride() for n in s1[k])
    # order rule for legacy keys in an HF dir
    keys = ["lm_head.weight", "model.layers.10.mlp.up_proj.weight", "model.layers.2.self_attn.rotary_emb.inv_freq",
            "model.layers.2.self_attn.o_proj.weight", "model.norm.weight", "model.layers.2.mlp.gate_proj.weight",
            "model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight"]
    assert N.hf_key_order(keys) == [
        "model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.o_proj.weight",
        "model.layers.2.self_attn.rotary_emb.inv_freq", "model.layers.2.mlp.gate_proj.weight",
        "model.layers.10.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]


# ----------------------------------------------------------------------------------------------------------------
# §11 crashes


@pytest.mark.parametrize("m,opts,exc,msg", [
    ("a", dict(tp_size=1, qkv_linear=True), ValueError, "torch.cat(): expected a non-empty list of Tensors"),
    ("a", dict(tp_size=8, kv_size_multiplier=2, qkv_linear=True), IndexError,
     "index 4 is out of bounds for dimension 0 with size 4"),
    ("a", dict(tp_size=4, qkv_linear=True), IndexError, "index 2 is out of bounds for dimension 0 with size 2"),
    ("a", dict(tp_size=8, qkv_linear=True), IndexError, "index 4 is out of bounds for dimension 0 with size 2"),
    ("b", dict(tp_size=2, kv_size_multiplier=2, qkv_linear=True), RuntimeError,
     "shape '[-1, 0, 32, 256]' is invalid for input of size 65536"),
    ("b", dict(tp_size=2, pp_size=3, virtual_pp_size=2), AssertionError, "The partition cannot be created"),
    ("c", dict(tp_size=2, pp_size=4, virtual_pp_size=2), AssertionError, "The partition cannot be created"),
    ("b", dict(tp_size=2, coalesce_qkv=True, qkv_linear=True), ValueError, "torch.cat(): expected a non-empty"),
    ("a", dict(tp_size=2, i_tp_round_factor=4), AssertionError, ""),
])
def test_crashes(models, m, opts, exc, msg):
    md = models[m]
    o = N.Options(**opts)
    with pytest.raises(exc) as ei:
        N.convert_from_full_state(md["sd"], md["config"], o)
    assert str(ei.value).startswith(msg)
    assert N.expected_outcome(m, o) == "crash"


def test_cli_crash_exit_status(models, tmp_path):
    a = models["a"]
    p = subprocess.run([sys.executable, str(HERE / "nxd_reference.py"), "--input_dir", a["hf"], "--output_dir",
                        str(tmp_path / "o"), "--config", a["config_path"], "--tp_size", "8", "--qkv_linear", "0",
                        "--kv_size_multiplier", "2"], capture_output=True, text=True)
    assert p.returncode != 0
    assert "IndexError: index 4 is out of bounds for dimension 0 with size 4" in p.stderr
    assert not (tmp_path / "o" / "model").exists() or os.listdir(tmp_path / "o" / "model") == []


# ----------------------------------------------------------------------------------------------------------------
# The whole §14 matrix: outcomes and §11 error signature counts


SPEC_ERROR_COUNTS = {  # §11 table, over 3 models x 1152 jobs (xser twins included), plus the extra cases
    ("RuntimeError", "shape '[-1, 0, 32, 256]' is invalid for input of size 65536"): 256,
    ("ValueError", "torch.cat(): expected a non-empty list of Tensors"): 228,  # + 1 coalesce extra case
    ("AssertionError", "The partition cannot be created"): 192,  # + 1 extra case (c pp4 vpp2)
    ("IndexError", "index 4 is out of bounds for dimension 0 with size 4"): 48,
    ("IndexError", "index 2 is out of bounds for dimension 0 with size 2"): 24,
    ("IndexError", "index 4 is out of bounds for dimension 0 with size 2"): 24,
}
SPEC_ACCEPTED = {"a": 1008, "b": 740, "c": 936}


def _norm_sig(e):
    s = str(e)
    if s.startswith("The partition cannot be created"):
        s = "The partition cannot be created"
    return (type(e).__name__, s)


def _check_round_trip(md, m, o, shards):
    """Our reverse model on our forward output against the §12-§14 rules (expected_round_trip)."""
    want = N.expected_round_trip(m, o)
    try:
        full = N.merge_to_full_state(lambda t, p, e: shards[(t, p)], md["config"], o)
        got = "exact" if _full_equal(full, md["sd"]) else "differs"
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        got = "crash"
        if not md["shape"].is_gqa and not o.qkv_linear and not o.coalesce_qkv:
            assert isinstance(e, KeyError) and e.args[0] == "q_proj.weight"
        else:
            assert str(e).startswith("split_with_sizes expects split_sizes to sum exactly to"), (m, o, e)
    assert got == want, (m, o, got, want)
    return got


def _full_equal(a, b):
    return len(a) > 0 and set(a) == set(b) and all(same_tensor(a[k], b[k]) for k in a)


def test_matrix_outcomes(models):
    """Every config of iter_configs: our forward outcome == expected_outcome (and error == expected_error); the §11
    error counts and §14 accepted counts; head order of weight_q/o_proj; for pp<=2, vpp 1: the round trip."""
    rt_seen = collections.Counter()
    counts = collections.Counter()
    accepted = collections.Counter()
    for m in ("a", "b", "c"):
        md = models[m]
        hd = md["shape"].head_dim
        for o, expect in N.iter_configs(m):
            main = not o.coalesce_qkv and o.pp_size <= 3 and o.hw_backend in ("trn1", "trn2")
            try:
                shards = N.convert_from_full_state(md["sd"], md["config"], o)
            except Exception as e:  # noqa: BLE001
                assert expect == "crash", (m, o, e)
                et, em = N.expected_error(m, o)
                assert type(e).__name__ == et and str(e).startswith(em), (m, o, e)
                if main:
                    counts[_norm_sig(e)] += 2  # the xser twin
                continue
            assert expect == "ok", (m, o)
            if main:
                accepted[m] += 2
            assert len(shards) == o.tp_size * o.pp_size
            if o.virtual_pp_size == 1 and o.pp_size <= 2 and o.hw_backend != "inf2":
                rt_seen[_check_round_trip(md, m, o, shards)] += 1
            if o.pp_size == 1:
                # §3: sliced tensors own exactly their bytes; only o_proj with qkv_linear is non-contiguous
                for sd in shards.values():
                    for k, v in sd.items():
                        if v.dim() == 1:
                            assert v is md["sd"][k]
                            continue
                        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), (m, o, k)
                        if o.qkv_linear and k.endswith("o_proj.weight"):
                            assert v.stride() == (1, v.shape[0]), (m, o, k)
                        else:
                            assert v.is_contiguous(), (m, o, k)
            if not o.qkv_linear:
                continue
            # every rank's weight_q rows / o_proj columns are whole heads in the predicted order; k/v are tiled
            for (t, p), sd in shards.items():
                if p != 0:
                    continue
                pre = "model.layers.0.self_attn."
                qh = N.q_heads_for_rank(m, o, t)
                wq = sd[pre + ("qkv_proj.weight_q" if not o.fuse_qkv else "qkv_proj.weight_qkv")][:len(qh) * hd]
                assert decode_rows(wq) == [(Q_KIND, 0, h, d) for h in qh for d in range(hd)]
                assert heads_of(sd[pre + "o_proj.weight"], row_major=False) == qh
                if not o.trn2 and o.tp_size == md["shape"].kv_heads * o.kv_size_multiplier and not o.fuse_qkv:
                    # §12.2: the only correct trn1 setting: every local q head sits with its kv head
                    kh = heads_of(sd[pre + "qkv_proj.weight_k"])
                    group = md["shape"].q_heads // md["shape"].kv_heads
                    assert kh == [qh[0] // group] and all(h // group == kh[0] for h in qh)
    assert {k: counts[k] for k in SPEC_ERROR_COUNTS} == SPEC_ERROR_COUNTS
    assert sum(counts.values()) == sum(SPEC_ERROR_COUNTS.values())
    assert dict(accepted) == SPEC_ACCEPTED
    assert sum(accepted.values()) // 2 == 1342
    assert rt_seen["exact"] and rt_seen["differs"] and rt_seen["crash"]


# ----------------------------------------------------------------------------------------------------------------
# §13/§14 round trip


SPEC_RT = {  # §14: (convert ERR, accepted, RT bit-exact, RT differs, RT crashes) per 1152 jobs
    "a": (144, 1008, 816, 120, 72),
    "b": (412, 740, 180, 40, 520),
    "c": (216, 936, 804, 12, 120),
}


def test_round_trip_predicate_matches_spec_table():
    for m, want in SPEC_RT.items():
        c = collections.Counter()
        for o, outcome in N.iter_configs(m, coalesce=False, extra=False, xser=True):
            rt = N.expected_round_trip(m, o)
            c["err" if outcome == "crash" else "acc"] += 1
            if rt:
                c[rt] += 1
        assert (c["err"], c["acc"], c["exact"], c["differs"], c["crash"]) == want, m


@pytest.mark.parametrize("m,opts,n", [
    ("a", dict(tp_size=4, kv_size_multiplier=2, hw_backend="trn1"), 128),
    ("a", dict(tp_size=4, kv_size_multiplier=4, hw_backend="trn1"), 160),
    ("a", dict(tp_size=1, kv_size_multiplier=2, hw_backend="trn2"), 512),
    ("a", dict(tp_size=8, kv_size_multiplier=2, hw_backend="trn2"), 64),
    ("b", dict(tp_size=1, kv_size_multiplier=2, hw_backend="trn2"), 1280),
    ("b", dict(tp_size=4, kv_size_multiplier=2, hw_backend="trn2"), 320),
])
def test_round_trip_split_sizes(models, m, opts, n):
    md = models[m]
    o = N.Options(qkv_linear=True, fuse_qkv=True, **opts)
    shards = {(t, p, 0): sd for (t, p, e), sd in N.iter_shards(md["sd"], md["config"], o)}
    with pytest.raises(RuntimeError, match=f"sum exactly to {n} "):
        N.merge_to_full_state(lambda t, p, e: shards[(t, p, e)], md["config"], o)


def test_round_trip_wrong_shape_and_cli(models, tmp_path):
    a = models["a"]
    o = N.Options(tp_size=1, qkv_linear=True, fuse_qkv=True, hw_backend="trn2")
    shards = {(t, p, 0): sd for (t, p, e), sd in N.iter_shards(a["sd"], a["config"], o)}
    full = N.merge_to_full_state(lambda t, p, e: shards[(t, p, e)], a["config"], o)
    assert tuple(full["model.layers.0.self_attn.q_proj.weight"].shape) == (256, 128)
    # the CLI round trip (xser files, absolute path) is exact for a, tp2 pp2 qkv_linear kvm1 trn1
    args = ["--config", a["config_path"], "--tp_size", "2", "--pp_size", "2", "--qkv_linear", "--save_xser",
            "--load_xser"]
    N.main(["--input_dir", a["pt"], "--output_dir", str(tmp_path / "s")] + args)
    N.main(["--reverse", "--input_dir", str(tmp_path / "s" / "model"), "--output_dir", str(tmp_path / "f")] + args)
    full = torch.load(tmp_path / "f" / "checkpoint.pt")
    assert _full_equal(full, a["sd"])
