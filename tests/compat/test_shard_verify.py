"""shard-verify on real shard sets: nx-shard's output and the files an independent model of NxD's converter
(tests/reference/nxd_reference.py, saved with torch.save) writes for the tiny real checkpoints pass; every kind
of damage is caught with exit 1 and the file (and tensor) named; files re-saved by torch 2.1.2 still verify."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, FIXTURES, PY21, ROOT, run

sys.path.insert(0, str(ROOT / "tests" / "reference"))
import nxd_reference as N  # noqa: E402

NX_SHARD = BIN / "nx-shard"
SHARD_VERIFY = BIN / "shard-verify"

# (model, converter options): layouts nx-shard accepts, covering pp/vpp placement, qkv_linear with kv replication,
# fused qkv (appended last), transposed o_proj, coalesced qkv, tied embeddings and legacy float32 inv_freq.
INTACT = [
    ("gqa_llama3", N.Options(tp_size=8, pp_size=2, kv_size_multiplier=4, qkv_linear=True, fuse_qkv=True,
                             save_xser=True)),
    ("gqa_llama3", N.Options(tp_size=2, pp_size=3)),
    ("mha_llama2", N.Options(tp_size=8, pp_size=2, virtual_pp_size=2, qkv_linear=True)),
    ("mha_llama2", N.Options(tp_size=2, coalesce_qkv=True)),
    ("gqa_7l_tied", N.Options(tp_size=8, pp_size=3, virtual_pp_size=2, kv_size_multiplier=2, qkv_linear=True)),
    ("gqa_7l_tied", N.Options(tp_size=4, pp_size=2, hw_backend="trn2", qkv_linear=True, fuse_qkv=True)),
    ("gqa_inv_freq", N.Options(tp_size=2, pp_size=2, qkv_linear=True)),
]

# The set the damage tests start from: every kv head on 4 ranks, xser.
BASE = INTACT[0]


def config_path(model):
    return FIXTURES / "models" / model / "config.json"


def nx_shard(model, opts, out):
    run([NX_SHARD, "--input", FIXTURES / "models" / model, "--output", out, "--quiet", *opts.cli_args()])
    return out


def reference(model, opts, out):
    N.write_shards(str(FIXTURES / "models" / model / "full_state.pt"), str(out), str(config_path(model)), opts)
    return out


def verify(model, opts, d, *extra):
    """Runs shard-verify with the NxD spellings of the layout; returns (exit code, JSON report or None)."""
    p = run([SHARD_VERIFY, d, "--config", config_path(model), *opts.cli_args(nxd_style=True), "--json", *extra],
            check=False)
    assert p.returncode in (0, 1, 2), p.stderr
    report = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, report


def assert_ok(model, opts, d, *extra):
    code, report = verify(model, opts, d, *extra)
    assert code == 0, json.dumps(report["problems"] if report else None, indent=1)
    assert report["ok"] and all(c["status"] in ("passed", "skipped") for c in report["checks"])
    return report


def problems(model, opts, d, *extra):
    code, report = verify(model, opts, d, *extra)
    assert code == 1, (code, report)
    return report["problems"]


def named(probs, file, tensor=None, text=""):
    return any(file in p["files"] and (tensor is None or p.get("tensor") == tensor) and text in p["message"]
               for p in probs)


def shard(d, tp, pp):
    return Path(d) / "model" / N.shard_filename(N.Options(), tp, pp)


def rel(tp, pp):
    return f"model/{N.shard_filename(N.Options(), tp, pp)}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """nx-shard's output for BASE, copied fresh for each damage."""
    model, opts = BASE
    src = nx_shard(model, opts, tmp_path_factory.mktemp("base") / "out")
    n = [0]

    def fresh():
        n[0] += 1
        dst = tmp_path_factory.mktemp(f"damage{n[0]}") / "out"
        shutil.copytree(src, dst)
        return dst
    return fresh


@pytest.mark.parametrize("model,opts", INTACT, ids=[f"{m}-{o.short()}" for m, o in INTACT])
def test_intact_sets_pass(tmp_path, model, opts):
    ours = nx_shard(model, opts, tmp_path / "ours")
    report = assert_ok(model, opts, ours, "--manifest", ours / "nx-shard.manifest.jsonl")
    assert len(report["files"]) == opts.tp_size * opts.pp_size
    assert report["dtype"] == "bfloat16"
    cross = next(c for c in report["checks"] if c["check"] == "cross-rank")
    assert cross["status"] == "passed" and "replicated regions compared" in cross["detail"]
    # What NxD writes (torch.save), verified the same way; --record then describes it.
    ref = reference(model, opts, tmp_path / "ref")
    record = tmp_path / "ref.manifest.jsonl"
    assert_ok(model, opts, ref, "--record", record)
    assert_ok(model, opts, ref / "model", "--manifest", record, "--fast")
    lines = [json.loads(l) for l in record.read_text().splitlines()]
    shards = [l for l in lines if l.get("kind") == "nxd-shard"]
    assert len(shards) == opts.tp_size * opts.pp_size


def test_human_summary_and_grid(base):
    model, opts = BASE
    d = base()
    p = run([SHARD_VERIFY, d, "--config", config_path(model), *opts.cli_args()], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "   tp ->  01234567\n  pp   0  ........\n  pp   1  ........\n" in p.stdout
    assert p.stdout.rstrip().endswith("result: OK")
    os.remove(shard(d, 5, 1))
    p = run([SHARD_VERIFY, d, "--config", config_path(model), *opts.cli_args()], check=False)
    assert p.returncode == 1
    assert "  pp   1  .....M..\n" in p.stdout and f"{rel(5, 1)}: missing" in p.stdout
    assert p.stderr.strip() == f"shard-verify: error: 1 problems found in {d}"


def test_missing_stray_truncated_and_empty_files(base):
    model, opts = BASE
    d = base()
    os.remove(shard(d, 3, 0))
    (d / "model" / "dp_rank_00_tp_rank_08_pp_rank_00.pt").write_bytes(shard(d, 0, 0).read_bytes())
    (d / "model" / "README").write_text("x")
    f = shard(d, 1, 1)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    shard(d, 2, 1).write_bytes(b"")
    probs = problems(model, opts, d)
    assert named(probs, rel(3, 0), text="missing")
    assert named(probs, "model/dp_rank_00_tp_rank_08_pp_rank_00.pt", text="outside the layout")
    assert named(probs, "model/README", text="stray")
    assert named(probs, rel(1, 1), text="truncated")
    assert named(probs, rel(2, 1), text="empty file")
    assert len(probs) == 5, probs


def test_flipped_byte_with_manifest(base):
    model, opts = BASE
    d = base()
    f = shard(d, 6, 0)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    probs = problems(model, opts, d, "--manifest", d / "nx-shard.manifest.jsonl")
    assert named(probs, rel(6, 0), text="sha256 differs"), probs


def test_swapped_files(base):
    model, opts = BASE
    # Renamed: torch names the archive inside after the file, so even the header-only pass sees it.
    d = base()
    a, b = shard(d, 0, 0), shard(d, 1, 0)
    a.rename(d / "tmp")
    b.rename(a)
    (d / "tmp").rename(b)
    probs = problems(model, opts, d, "--fast")
    assert named(probs, rel(0, 0), text="swapped") and named(probs, rel(1, 0), text="swapped")
    # Re-saved under each other's names (clean archives): the kv heads give it away, and the manifest.
    d = base()
    a, b = shard(d, 2, 1), shard(d, 3, 1)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    torch.save(sb, a)
    torch.save(sa, b)
    probs = problems(model, opts, d)
    t = "model.layers.3.self_attn.qkv_proj.weight_qkv"
    assert named(probs, rel(2, 1), t, "kv head 0) differ from the 3 identical copies"), probs
    assert named(probs, rel(3, 1), t, "kv head 1) differ from the 3 identical copies"), probs
    assert all(p["check"] == "cross-rank" for p in probs)
    probs = problems(model, opts, d, "--fast", "--manifest", d / "nx-shard.manifest.jsonl")
    assert named(probs, rel(2, 1), text="sha256") and named(probs, rel(3, 1), text="sha256")


def test_file_from_a_different_layout(base, tmp_path):
    model, opts = BASE
    d = base()
    other_opts = opts.replace(tp_size=4, kv_size_multiplier=2)
    other = nx_shard(model, other_opts, tmp_path / "other")
    shutil.copy(shard(other, 1, 1), shard(d, 1, 1))
    probs = problems(model, opts, d)
    assert named(probs, rel(1, 1), "lm_head.weight", "shape [256, 256], expected [128, 256]"), probs
    assert {p["check"] for p in probs} == {"structure"}
    # The whole tp 4 set against the tp 8 layout: half the files are missing.
    probs = problems(model, opts, other)
    assert named(probs, rel(7, 0), text="missing")


@pytest.mark.parametrize("source", ["nx-shard", "reference"])
def test_edited_kv_replica_is_named(base, tmp_path, source):
    model, opts = BASE
    d = base() if source == "nx-shard" else reference(model, opts, tmp_path / "ref")
    # tp rank 4 holds q head 2 (rows 0:32), then k of kv head 0 (rows 32:64) and v of kv head 0 (rows 64:96).
    f = shard(d, 4, 0)
    sd = torch.load(f, weights_only=True)
    t = "model.layers.1.self_attn.qkv_proj.weight_qkv"
    sd[t][70, 3] += 1
    torch.save(sd, f)
    probs = problems(model, opts, d)
    assert len(probs) == 1, probs
    assert named(probs, rel(4, 0), t,
                 "rows 64..96 (copy of model.layers.1.self_attn.v_proj.weight rows 0..32, kv head 0) differ"), probs
    # --fast reads no tensor data.
    assert_ok(model, opts, d, "--fast")


def test_edited_norm_is_named(base):
    model, opts = BASE
    d = base()
    f = shard(d, 7, 1)
    sd = torch.load(f, weights_only=True)
    sd["model.norm.weight"][0] += 1
    torch.save(sd, f)
    probs = problems(model, opts, d)
    assert named(probs, rel(7, 1), "model.norm.weight", "differ from the 7 identical copies"), probs


def test_usage_errors_exit_2(base, tmp_path):
    model, opts = BASE
    d = base()
    code, report = verify(model, opts.replace(tp_size=3), d)
    assert code == 2 and report is None
    code, _ = verify(model, opts, tmp_path / "nope")
    assert code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code, _ = verify(model, opts, d, "--manifest", bad)
    assert code == 2


def test_files_resaved_by_torch21_verify(base):
    """The Neuron SDK's torch 2.1.2 loads and re-saves every file; the result still verifies."""
    model, opts = BASE
    d = base()
    script = ("import sys, torch\n"
              "for p in sys.argv[1:]:\n"
              "    torch.save(torch.load(p, weights_only=True), p)\n")
    run([PY21, "-c", script, *sorted(str(p) for p in (d / "model").glob("*.pt"))])
    assert_ok(model, opts, d)
    # Only the bytes outside the tensors (torch version records) may differ from nx-shard's manifest.
    code, report = verify(model, opts, d, "--manifest", d / "nx-shard.manifest.jsonl")
    assert code in (0, 1) and all(p["check"] == "manifest" for p in report["problems"])
