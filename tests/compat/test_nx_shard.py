"""nx-shard against an independent model of NxD's converter (tests/reference/nxd_reference.py) over a wide matrix
of configurations on the tiny real checkpoints: every configuration nx-shard accepts gives exactly the reference's
files (key order, dtype, shape, strides, bytes); every configuration where NxD crashes is refused with exit 2;
torch 2.1.2 and 2.15 load every shard."""
import itertools
import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from conftest import BIN, FIXTURES, ROOT, load_in_torch21, run, tensor_digest

sys.path.insert(0, str(ROOT / "tests" / "reference"))
import nxd_reference as N  # noqa: E402

NX_SHARD = BIN / "nx-shard"
MODELS = ["gqa_llama3", "mha_llama2", "gqa_7l_tied", "gqa_inv_freq"]


@lru_cache(maxsize=None)
def full_state(model):
    d = FIXTURES / "models" / model
    return N.load_full_state(str(d / "full_state.pt")), json.loads((d / "config.json").read_text())


def cli(opts):
    args = ["--tp", opts.tp_size, "--pp", opts.pp_size, "--vpp", opts.virtual_pp_size,
            "--kv-size-multiplier", opts.kv_size_multiplier, "--hw-backend", opts.hw_backend]
    for flag, on in (("--qkv-linear", opts.qkv_linear), ("--fuse-qkv", opts.fuse_qkv), ("--coalesce-qkv", opts.coalesce_qkv)):
        if on:
            args.append(flag)
    return [str(a) for a in args]


def matrix(model):
    """A broad, deterministic matrix: every tp/kvm/flag combination at pp 1 and 2, plus uneven pp and vpp."""
    for tp, kvm, qkv, fuse, hw, (pp, vpp) in itertools.product(
        (1, 2, 4, 8), (1, 2, 4), (False, True), (False, True), ("trn1", "trn2"), ((1, 1), (2, 1), (3, 1), (2, 2))
    ):
        if fuse and not qkv:
            continue
        yield N.Options(tp_size=tp, pp_size=pp, virtual_pp_size=vpp, kv_size_multiplier=kvm,
                        qkv_linear=qkv, fuse_qkv=fuse, hw_backend=hw)
    yield N.Options(tp_size=2, pp_size=1, coalesce_qkv=True)


def same(ours, ref):
    assert list(ours) == list(ref), "key order"
    for k in ref:
        a, b = ours[k], ref[k]
        assert (a.dtype, tuple(a.shape), a.stride()) == (b.dtype, tuple(b.shape), b.stride()), k
        assert torch.equal(a, b), k


@pytest.mark.parametrize("model", MODELS)
def test_matches_reference_over_matrix(tmp_path, model):
    state, config = full_state(model)
    src = FIXTURES / "models" / model
    accepted = refused = 0
    for i, opts in enumerate(matrix(model)):
        out = tmp_path / f"c{i}"
        p = run([NX_SHARD, "--input", src, "--output", out, "--quiet", *cli(opts)], check=False)
        try:
            ref = N.convert_from_full_state(state, config, opts)
        except Exception as e:  # NxD crashes here: we must refuse.
            assert p.returncode == 2, f"{opts.short()}: NxD crashes ({e!r}) but nx-shard exited {p.returncode}"
            refused += 1
            continue
        if p.returncode == 2:
            # Refused where NxD writes files: only allowed where NxD is silently wrong (checked by the planner's
            # own exhaustive tests); the message must say why.
            assert "\n" not in p.stderr.strip() and ("wrong" in p.stderr or "drop" in p.stderr or "split" in p.stderr or "pair" in p.stderr), p.stderr
            refused += 1
            continue
        assert p.returncode == 0, p.stderr
        accepted += 1
        files = sorted((out / "model").iterdir())
        assert [f.name for f in files] == sorted(N.shard_filename(opts, t, q) for (t, q) in ref)
        for (tp, pp), shard in ref.items():
            ours = torch.load(out / "model" / N.shard_filename(opts, tp, pp), weights_only=True, mmap=True)
            same(ours, shard)
    assert accepted >= 20 and refused >= 20, (accepted, refused)


def test_hf_dir_and_full_state_give_the_same_files(tmp_path):
    src = FIXTURES / "models" / "gqa_7l_tied"
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--tp", "4", "--pp", "3", "--qkv-linear", "--fuse-qkv", "--quiet"]
    run([NX_SHARD, "--input", src, "--output", a, *flags])
    run([NX_SHARD, "--input", src / "full_state.pt", "--output", b, "--config", src / "config.json", *flags])
    for f in (a / "model").iterdir():
        assert f.read_bytes() == (b / "model" / f.name).read_bytes(), f.name


def test_every_shard_loads_in_torch21(tmp_path):
    src = FIXTURES / "models" / "gqa_llama3"
    out = tmp_path / "o"
    run([NX_SHARD, "--input_dir", src, "--output_dir", out, "--tp_size", "8", "--pp_size", "2",
         "--kv_size_multiplier", "4", "--qkv_linear", "1", "--fuse_qkv", "1", "--save_xser", "1", "--quiet"])
    files = sorted(str(p) for p in (out / "model").glob("*.pt"))
    assert len(files) == 16
    assert all(Path(f + ".tensors").is_dir() and not any(Path(f + ".tensors").iterdir()) for f in files)
    in21 = load_in_torch21(files)
    for f in files:
        sd = torch.load(f, weights_only=True, mmap=True)
        assert list(in21[f]) == list(sd)


def test_seed_layout_dry_run_from_config_alone(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8,
                                  "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 128256}))
    p = run([NX_SHARD, "--dry-run", "--config", config, "--output", tmp_path / "out", "--tp", "32", "--pp", "8",
             "--kv-size-multiplier", "4", "--qkv-linear", "--fuse-qkv", "--xser"])
    lines = [l for l in p.stdout.splitlines() if l.startswith("dp_rank_")]
    assert len(lines) == 256 and len(set(l.split()[0] for l in lines)) == 256
    assert not (tmp_path / "out").exists()


def test_split_xser_layout_loads_like_nxd_training_checkpoint(tmp_path):
    """--xser-layout split writes NxD's training-checkpoint form; NxD's loader (torch 2.1.2, and 2.15 with the
    class allow-listed) reads the same tensors as the converter form, made contiguous."""
    from test_xser import LOAD

    src = FIXTURES / "models" / "gqa_llama3"
    flags = ["--tp", "2", "--pp", "2", "--qkv-linear", "--quiet"]
    run([NX_SHARD, "--input", src, "--output", tmp_path / "plain", *flags])
    run([NX_SHARD, "--input", src, "--output", tmp_path / "split", "--xser-layout", "split", *flags])
    manifest = [json.loads(l) for l in (tmp_path / "split" / "nx-shard.manifest.jsonl").read_text().splitlines()]
    for f in sorted((tmp_path / "plain" / "model").glob("*.pt")):
        want = {k: [str(t.dtype).replace("torch.", ""), list(t.shape), list(t.contiguous().stride()), tensor_digest(t)]
                for k, t in torch.load(f, weights_only=True).items()}
        split = tmp_path / "split" / "model" / f.name
        for python in (sys.executable, __import__("conftest").PY21):
            got = json.loads(run([python, "-c", LOAD, split]).stdout)
            assert got == want, python
        n = len(want)
        assert len(list((tmp_path / "split" / "model" / (f.name + ".tensors")).iterdir())) == n
        assert sum(1 for m in manifest if m["path"].startswith(f"model/{f.name}")) == n + 2


def test_killed_runs_leave_only_complete_files_and_resume(tmp_path):
    """SIGKILL at various points: every file under a final name is complete (loads, equals a clean run), and a
    rerun finishes the set."""
    import signal
    import subprocess
    import time

    src = FIXTURES / "models" / "gqa_7l_tied"
    flags = ["--tp", "8", "--pp", "3", "--qkv-linear", "--kv-size-multiplier", "2", "--jobs", "1", "--quiet"]
    clean = tmp_path / "clean"
    run([NX_SHARD, "--input", src, "--output", clean, *flags])
    want = {f.name: f.read_bytes() for f in (clean / "model").glob("*.pt")}
    killed = 0
    for attempt, delay in enumerate([0.0, 0.005, 0.01, 0.02, 0.04, 0.08]):
        out = tmp_path / f"o{attempt}"
        p = subprocess.Popen([str(NX_SHARD), "--input", str(src), "--output", str(out), *flags],
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        killed += p.wait() == -signal.SIGKILL
        for f in (out / "model").glob("*.pt") if (out / "model").exists() else []:
            assert f.read_bytes() == want[f.name], f"{f.name} under its final name is not complete"
        run([NX_SHARD, "--input", src, "--output", out, *flags])
        got = {f.name: f.read_bytes() for f in (out / "model").glob("*.pt")}
        assert got == want
        assert not [f for f in (out / "model").iterdir() if ".partial-" in f.name]
    assert killed >= 1


def test_full_disk_is_exit_3_and_keeps_finished_files(tmp_path):
    """A 5 MB filesystem (tmpfs) fills up: one-line error with the fix, exit 3, no partial file under a final
    name; the files that were finished stay."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(small)], check=True)
    try:
        src = FIXTURES / "models" / "gqa_llama3"
        p = run([NX_SHARD, "--input", src, "--output", small / "out", "--tp", "2", "--pp", "2", "--quiet"], check=False)
        assert p.returncode == 3, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left" in lines[0] and "free space" in lines[0]
        for f in (small / "out" / "model").iterdir():
            assert ".partial-" not in f.name
            torch.load(f, weights_only=True)  # every file left is complete
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_bad_inputs_get_one_line_errors_and_write_nothing(tmp_path):
    import shutil

    src = FIXTURES / "models" / "gqa_llama3"

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def drop_config(d):
        (d / "config.json").unlink()

    def bad_heads(d):
        c = json.loads((d / "config.json").read_text())
        c["num_key_value_heads"] = 3
        (d / "config.json").write_text(json.dumps(c))

    def wrong_hidden(d):
        c = json.loads((d / "config.json").read_text())
        c["intermediate_size"] = 768
        (d / "config.json").write_text(json.dumps(c))

    def missing_tensor(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        c = json.loads((d / "config.json").read_text())
        c["num_hidden_layers"] = 10
        (d / "config.json").write_text(json.dumps(c))

    def truncated(d):
        f = d / "model-00002-of-00003.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    cases = {
        "no_config": (drop_config, "config.json"),
        "bad_heads": (bad_heads, "num_key_value_heads"),
        "wrong_shape": (wrong_hidden, "shape"),
        "missing_tensor": (missing_tensor, "model.layers"),
        "truncated": (truncated, "model-00002-of-00003.safetensors"),
    }
    for name, (edit, needle) in cases.items():
        d = variant(name, edit)
        out = tmp_path / f"out_{name}"
        p = run([NX_SHARD, "--input", d, "--output", out, "--tp", "2", "--quiet"], check=False)
        assert p.returncode == 2, (name, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (name, p.stderr)
        assert not list(out.rglob("*.pt")), name


def test_output_dir_of_another_layout_is_refused(tmp_path):
    src = FIXTURES / "models" / "gqa_llama3"
    out = tmp_path / "o"
    run([NX_SHARD, "--input", src, "--output", out, "--tp", "2", "--pp", "2", "--quiet"])
    before = {f.name: f.read_bytes() for f in (out / "model").iterdir()}
    for flags, needle in ((["--pp", "1"], "another layout"), (["--pp", "2", "--qkv-linear"], "not this layout")):
        p = run([NX_SHARD, "--input", src, "--output", out, "--tp", "2", *flags, "--quiet"], check=False)
        assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert {f.name: f.read_bytes() for f in (out / "model").iterdir()} == before
