"""Our safetensors reader and writer against the real safetensors and transformers libraries, on the tiny real
Llama checkpoints written by transformers (scripts/gen_fixtures.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, describe, load_in_torch21, run

MODELS = ["gqa_llama3", "mha_llama2", "gqa_7l_tied", "gqa_inv_freq"]


def model_dir(name):
    d = FIXTURES / "models" / name
    if not (d / "model.safetensors.index.json").exists():
        pytest.fail(f"{d} is missing: run `make fixtures`")
    return d


def state(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(d / shard))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_resharding_reproduces_huggingface_hub_bytes(tmp_path, ptconv, name):
    """The same tensors in the same order and the same max_shard_size as huggingface_hub's
    save_torch_state_dict (what save_pretrained calls): identical shard files and index."""
    from collections import OrderedDict

    from huggingface_hub import save_torch_state_dict

    src = model_dir(name)
    order = [json.loads(l)["name"] for l in run([ptconv, "dump", src]).stdout.splitlines()]
    tensors = state(src)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    ref = tmp_path / "ref"
    ref.mkdir()
    save_torch_state_dict(OrderedDict((k, tensors[k]) for k in order), ref, max_shard_size=total // 2)
    out = tmp_path / "out"
    run([ptconv, "to-safetensors", src, out, total // 2])
    names = sorted(p.name for p in ref.iterdir())
    assert len(names) >= 3
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == names
    for f in names:
        if f.endswith(".json"):
            assert json.loads((out / f).read_text())["weight_map"] == json.loads((ref / f).read_text())["weight_map"]
        else:
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_index_is_byte_identical_to_transformers(tmp_path, ptconv):
    """For a checkpoint whose file order is its state-dict order, the whole directory matches save_pretrained."""
    src = model_dir("gqa_llama3")
    total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    out = tmp_path / "out"
    run([ptconv, "to-safetensors", src, out, total // 2])
    for f in sorted(p.name for p in src.iterdir() if p.name.endswith((".safetensors", ".json"))):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f


@pytest.mark.parametrize("name", MODELS)
def test_resharded_dir_loads_in_transformers(tmp_path, ptconv, name):
    from transformers import AutoModelForCausalLM

    src = model_dir(name)
    out = tmp_path / "out"
    run([ptconv, "to-safetensors", src, out, 2_000_000])
    assert len(list(out.glob("model-*.safetensors"))) > 3
    assert describe(state(out)) == describe(state(src))
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)(ids).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_to_pt_loads_in_both_torch_versions(tmp_path, ptconv, name):
    src = model_dir(name)
    out = tmp_path / f"{name}.pt"
    run([ptconv, "to-pt", src, out])
    want = describe(state(src))
    assert describe(torch.load(out, weights_only=True, mmap=True)) == want
    assert load_in_torch21([str(out)])[str(out)] == want


@pytest.mark.parametrize("name", MODELS)
def test_full_state_pt_reads_like_torch(tmp_path, ptconv, name):
    """full_state.pt = torch.save(model.state_dict()) (tied weights share storage): dump equals torch.load,
    and converting it to safetensors gives what safetensors loads."""
    pt = model_dir(name) / "full_state.pt"
    rows = [json.loads(l) for l in run([ptconv, "dump", pt]).stdout.splitlines()]
    sd = torch.load(pt, weights_only=True)
    assert {r["name"]: r["sha256"] for r in rows} == {k: v[3] for k, v in describe(sd).items()}
    out = tmp_path / "st"
    run([ptconv, "to-safetensors", pt, out, 10**12])
    assert describe(load_file(out / "model.safetensors")) == {k: [v[0], v[1], v[2], v[3]] for k, v in describe({k: t.contiguous() for k, t in sd.items()}).items()}


def test_corrupt_safetensors_get_one_line_errors(tmp_path, ptconv):
    src = model_dir("gqa_llama3")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "truncated.safetensors": data[: len(data) - 100],
        "short.safetensors": data[:5],
        "huge_header.safetensors": (200_000_000).to_bytes(8, "little") + data[8:],
        "lying_offsets.safetensors": data[:8] + data[8 : 8 + header_len].replace(b'"data_offsets":[0,', b'"data_offsets":[2,', 1) + data[8 + header_len :],
        "bad_dtype.safetensors": data[:8] + data[8 : 8 + header_len].replace(b'"BF16"', b'"XF16"', 1) + data[8 + header_len :],
        "trailing.safetensors": data + b"\0" * 16,
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        r = run([ptconv, "dump", p], check=False)
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr, (name, r.stderr)
    missing = tmp_path / "missing_shard"
    missing.mkdir()
    for f in src.iterdir():
        if f.name != "model-00002-of-00003.safetensors":
            (missing / f.name).write_bytes(f.read_bytes())
    r = run([ptconv, "dump", missing], check=False)
    assert r.returncode == 2 and "model-00002-of-00003.safetensors" in r.stderr
