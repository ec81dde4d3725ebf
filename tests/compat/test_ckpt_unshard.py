"""ckpt-unshard on the tiny real checkpoints: HF dir -> nx-shard -> ckpt-unshard gives back the original tensors bit
for bit over a matrix of every layout family nx-shard accepts, and so do shards written by the independent model of
NxD's converter (tests/reference/nxd_reference.py) and NxD training-checkpoint layouts (xser with TensorReferences,
tag directories with newest/done markers); the output is what save_pretrained writes (same shard files and index,
byte for byte) and transformers loads it to the same logits; replicas that differ fail --check-replicas (exit 1);
missing/truncated rank files and wrong layout flags are one-line errors (exit 2)."""
import itertools
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, FIXTURES, ROOT, run

sys.path.insert(0, str(ROOT / "tests" / "reference"))
import nxd_reference as N  # noqa: E402

NX_SHARD = BIN / "nx-shard"
UNSHARD = BIN / "ckpt-unshard"
MODELS = ["gqa_llama3", "mha_llama2", "gqa_7l_tied", "gqa_inv_freq"]


def model_dir(model):
    return FIXTURES / "models" / model


@lru_cache(maxsize=None)
def original(model):
    """Every tensor of the fixture's HF directory, by name."""
    out = {}
    for f in sorted(model_dir(model).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def hf_state(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got, want, what):
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(want), f"{what}: keys"
    for k, t in want.items():
        g = got[k]
        assert g.dtype == t.dtype and g.shape == t.shape, f"{what}: {k}"
        assert torch.equal(bits(g), bits(t)), f"{what}: {k} differs"


def flags(opts, tiling=False):
    a = ["--tp", opts.tp_size, "--pp", opts.pp_size, "--vpp", opts.virtual_pp_size,
         "--kv-size-multiplier", opts.kv_size_multiplier, "--hw-backend", opts.hw_backend]
    for flag, on in (("--qkv-linear", opts.qkv_linear), ("--fuse-qkv", opts.fuse_qkv),
                     ("--coalesce-qkv", opts.coalesce_qkv), ("--allow-nxd-trn2-kv-tiling", tiling)):
        if on:
            a.append(flag)
    return [str(x) for x in a]


def unshard(inp, out, model, fl, *extra, check=True):
    return run([UNSHARD, "--input", inp, "--output", out, "--config", model_dir(model) / "config.json", "-q",
                *fl, *extra], check=check)


PIPELINES = ((1, 1), (2, 1), (3, 1), (2, 2))


def matrix():
    """Every layout family: plain tp, qkv_linear on trn1 and trn2 (NxD's kv tiling included), fused qkv, coalesced
    qkv, each with one of the pipeline settings in turn (the Rust tests cover the full product on synthetic models);
    nx-shard decides which are accepted."""
    combos = [c for c in itertools.product((1, 2, 4, 8), (1, 2, 4), (False, True), (False, True), ("trn1", "trn2"))
              if c[2] or not (c[3] or c[1] > 1 or c[4] == "trn2")]
    for j, (tp, kvm, qkv, fuse, hw) in enumerate(combos):
        pp, vpp = PIPELINES[j % len(PIPELINES)]
        opts = N.Options(tp_size=tp, pp_size=pp, virtual_pp_size=vpp, kv_size_multiplier=kvm, qkv_linear=qkv,
                         fuse_qkv=fuse, hw_backend=hw)
        yield opts, hw == "trn2" and kvm > 1
    yield N.Options(tp_size=2, pp_size=1, coalesce_qkv=True), False


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_over_matrix(tmp_path, model):
    """nx-shard -> ckpt-unshard (with --check-replicas) is the identity; every third accepted layout is also
    written by the independent reference converter, and those shards unshard to the original too."""
    want = original(model)
    accepted = from_reference = 0
    for i, (opts, tiling) in enumerate(matrix()):
        fl = flags(opts, tiling)
        shards, out = tmp_path / f"s{i}", tmp_path / f"o{i}"
        p = run([NX_SHARD, "--input", model_dir(model), "--output", shards, "--quiet", *fl], check=False)
        if p.returncode == 2:
            continue
        assert p.returncode == 0, p.stderr
        # Several output shards for some layouts; a single model.safetensors for others.
        size = ["5GB", "2MB"][i % 2]
        unshard(shards, out, model, fl, "--check-replicas", "--max-shard-size", size)
        assert_same(hf_state(out), want, f"{model} {opts.short()}")
        accepted += 1
        if accepted % 3 == 0:
            ref = tmp_path / f"r{i}"
            N.write_shards(str(model_dir(model)), str(ref), str(model_dir(model) / "config.json"),
                           opts.replace(save_xser=bool(i % 2)))
            unshard(ref / "model", tmp_path / f"ro{i}", model, fl, "--check-replicas")
            assert_same(hf_state(tmp_path / f"ro{i}"), want, f"{model} reference {opts.short()}")
            from_reference += 1
            shutil.rmtree(ref)
            shutil.rmtree(tmp_path / f"ro{i}")
        shutil.rmtree(shards)
        shutil.rmtree(out)
    assert accepted >= 20 and from_reference >= 6, (accepted, from_reference)


@pytest.mark.parametrize("model", MODELS)
def test_output_is_what_save_pretrained_writes(tmp_path, model):
    """Same max_shard_size as the fixture (total // 2): the same shard files and index, byte for byte."""
    index = json.loads((model_dir(model) / "model.safetensors.index.json").read_text())
    limit = index["metadata"]["total_size"] // 2
    fl = ["--tp", "2", "--pp", "2"] + (["--qkv-linear"] if model != "mha_llama2" else [])
    if model == "gqa_7l_tied":
        fl = ["--tp", "4", "--pp", "3", "--qkv-linear"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    unshard(tmp_path / "s", tmp_path / "o", model, fl, "--max-shard-size", str(limit))
    names = sorted(p.name for p in model_dir(model).iterdir() if p.name.startswith("model"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.name.startswith("model")) == names
    for n in names:
        assert (tmp_path / "o" / n).read_bytes() == (model_dir(model) / n).read_bytes(), n
    assert (tmp_path / "o" / "config.json").read_bytes() == (model_dir(model) / "config.json").read_bytes()


@pytest.mark.parametrize("model,fl", [
    ("gqa_llama3", ["--tp", "4", "--pp", "2", "--qkv-linear", "--kv-size-multiplier", "2", "--fuse-qkv"]),
    ("gqa_7l_tied", ["--tp", "8", "--pp", "3", "--vpp", "2", "--qkv-linear", "--kv-size-multiplier", "2"]),
    ("mha_llama2", ["--tp", "2", "--coalesce-qkv"]),
])
def test_transformers_logits_match(tmp_path, model, fl):
    from transformers import AutoModelForCausalLM

    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    unshard(tmp_path / "s", tmp_path / "o", model, fl)
    ids = torch.tensor([[1, 17, 254, 999, 3, 512, 77, 1023, 8, 64]])
    logits = []
    for path in (model_dir(model), tmp_path / "o"):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        m.eval()
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_training_checkpoint_and_pt_format(tmp_path, ptconv):
    """nx-shard output rewritten in NxD's training-checkpoint layout (reference file + tensor_<i>.pt + .info.pt per
    rank, <ckpt>/<tag>/model/, checkpoint/done/newest markers) unshards to the original; a tag without `done` is
    refused; --format pt writes NxD's checkpoint.pt."""
    model = "gqa_inv_freq"
    fl = ["--tp", "4", "--pp", "3", "--qkv-linear", "--kv-size-multiplier", "2", "--fuse-qkv"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    ckpt = tmp_path / "ckpt"
    for tag, done in (("step_50", True), ("step_100", False)):
        (ckpt / tag / "model").mkdir(parents=True)
        for f in sorted((tmp_path / "s" / "model").glob("*.pt")):
            run([ptconv, "to-xser-split", f, ckpt / tag / "model" / f.name])
        (ckpt / tag / "checkpoint").write_text("1")
        if done:
            (ckpt / tag / "done").write_text("1")
    (ckpt / "newest").write_text("step_50")
    p = unshard(ckpt, tmp_path / "o", model, fl, "--tag", "latest", "--check-replicas")
    assert "step_50" in p.stderr
    assert_same(hf_state(tmp_path / "o"), original(model), "training checkpoint")

    (ckpt / "newest").write_text("step_100")
    p = unshard(ckpt, tmp_path / "o2", model, fl, check=False)
    assert p.returncode == 2 and "no `done` marker" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o2").exists()

    unshard(ckpt / "step_50" / "model", tmp_path / "pt", model, fl, "--format", "pt")
    assert sorted(x.name for x in (tmp_path / "pt").iterdir()) == ["checkpoint.pt", "ckpt-unshard.manifest.jsonl"]
    full = torch.load(tmp_path / "pt" / "checkpoint.pt", weights_only=True)
    assert list(full) == N.hf_key_order(list(original(model)))
    assert_same(dict(full), original(model), "checkpoint.pt")


def test_tied_pt_holds_the_head_like_state_dict(tmp_path):
    model = "gqa_7l_tied"
    fl = ["--tp", "4", "--pp", "2", "--qkv-linear"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    unshard(tmp_path / "s", tmp_path / "pt", model, fl, "--format", "pt")
    full = torch.load(tmp_path / "pt" / "checkpoint.pt", weights_only=True)
    ref = N.load_full_state(str(model_dir(model) / "full_state.pt"))
    assert list(full) == list(ref)
    assert full["lm_head.weight"].untyped_storage().data_ptr() == full["model.embed_tokens.weight"].untyped_storage().data_ptr()
    assert_same(dict(full), dict(ref), "tied checkpoint.pt")


def test_replicas_that_differ_fail_the_check(tmp_path):
    model = "gqa_llama3"
    fl = ["--tp", "4", "--qkv-linear", "--kv-size-multiplier", "2"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    # tp rank 2 holds a copy of rank 0's kv head (K0 tiled by the kv size multiplier): let it drift.
    f = tmp_path / "s" / "model" / "dp_rank_00_tp_rank_02_pp_rank_00.pt"
    sd = torch.load(f, weights_only=True)
    key = "model.layers.3.self_attn.qkv_proj.weight_k"
    sd[key] = sd[key].clone()
    sd[key][1, 2] += 1
    torch.save(sd, f)
    p = unshard(tmp_path / "s", tmp_path / "o", model, fl, "--check-replicas", check=False)
    assert p.returncode == 1, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and f.name in line and key in line and "model.layers.3.self_attn.k_proj.weight" in line, line
    assert not (tmp_path / "o").exists()
    # Without the check the first copy is read: the original comes back.
    unshard(tmp_path / "s", tmp_path / "o", model, fl)
    assert_same(hf_state(tmp_path / "o"), original(model), "unchecked")


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    model = "gqa_7l_tied"
    fl = ["--tp", "4", "--pp", "2", "--qkv-linear"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", *fl])
    shards = tmp_path / "s" / "model"

    def refused(fl2, *words):
        p = unshard(tmp_path / "s", tmp_path / "o", model, fl2, check=False)
        line = p.stderr.strip()
        assert p.returncode == 2 and "\n" not in line and line.startswith("ckpt-unshard: error: "), p.stderr
        for w in words:
            assert w in line, line
        assert not (tmp_path / "o").exists()

    refused(["--tp", "4", "--pp", "2"], "qkv_proj.weight_q", "does not produce")        # qkv_linear missing
    refused(["--tp", "4", "--pp", "2", "--vpp", "2", "--qkv-linear"], "is missing")     # wrong vpp
    refused(["--tp", "2", "--pp", "4", "--hw-backend", "trn2", "--qkv-linear"], "--tp 4 --pp 2")
    f = shards / "dp_rank_00_tp_rank_01_pp_rank_01.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    refused(fl, f.name)
    f.unlink()
    refused(fl, "missing rank file " + f.name)
    f.write_bytes(data)
    unshard(tmp_path / "s", tmp_path / "o", model, fl)


def test_fp32_state_wrapped_under_model(tmp_path):
    """Training state in fp32 (master weights), each rank's dict wrapped as {"model": {...}} (NxD's reverse
    conversion unwraps that too): --dtype bf16 gives the bf16 original back exactly, keep gives it widened."""
    model = "gqa_llama3"
    fl = ["--tp", "2", "--pp", "2", "--qkv-linear"]
    run([NX_SHARD, "--input", model_dir(model), "--output", tmp_path / "s", "--quiet", "--dtype", "fp32", *fl])
    for f in (tmp_path / "s" / "model").glob("*.pt"):
        torch.save({"model": torch.load(f, weights_only=True), "step": 7}, f)
    unshard(tmp_path / "s", tmp_path / "bf16", model, fl, "--dtype", "bf16", "--check-replicas")
    assert_same(hf_state(tmp_path / "bf16"), original(model), "fp32 -> bf16")
    unshard(tmp_path / "s", tmp_path / "keep", model, fl)
    assert_same(hf_state(tmp_path / "keep"), {k: v.float() for k, v in original(model).items()}, "fp32 kept")
