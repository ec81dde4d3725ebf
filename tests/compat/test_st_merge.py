"""st-merge against the real libraries: safetensors, torch.save/torch.load (current and 2.1.2),
transformers from_pretrained, and PEFT's own LoRA / rsLoRA / DoRA merge (merge_and_unload)."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import BIN, FIXTURES, describe, load_in_torch21, run
from test_safetensors import state as hf_state
from test_torch_pt import masked

ST_MERGE = BIN / "st-merge"
MODEL = FIXTURES / "models" / "gqa_llama3"
MHA = FIXTURES / "models" / "mha_llama2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def st_merge(*args, check=True):
    return run([ST_MERGE, "-q", *args], check=check)


def dir_state(path):
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    return hf_state(path)


def within_one_bf16_ulp(got, ref32, noise):
    """True when bf16 `got` is within one bf16 ulp (at the exact value's magnitude) of the fp32
    reference, allowing `noise`: what a different fp32 summation order may legitimately move."""
    mant, exp = torch.frexp(ref32.to(torch.bfloat16).float())
    ulp = torch.ldexp(torch.ones_like(ref32), exp - 8)
    bad = (got.float() - ref32).abs() > ulp + noise
    return not bad.any().item()


def logits(path_or_model, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if not hasattr(model, "forward"):
        model = AutoModelForCausalLM.from_pretrained(str(path_or_model), dtype=dtype)
    ids = torch.arange(3, 40).reshape(1, -1) % 1000
    with torch.no_grad():
        return model(ids).logits.float()


# ------------------------------------------------------------------------------------------------
# Merge, reshard, re-type, .pt


def test_pt_is_torch_save_byte_for_byte_and_loads_in_torch21(tmp_path):
    out = tmp_path / "llama.pt"
    st_merge(MODEL, "-o", out)
    ours = torch.load(out, weights_only=True)
    state = hf_state(MODEL)
    assert sorted(ours) == sorted(state)
    # The same dict, in our key order, saved by torch.
    ref = tmp_path / "ref" / "llama.pt"
    ref.parent.mkdir()
    torch.save({k: state[k] for k in ours}, ref)
    assert masked(out) == masked(ref), "our archive differs from torch.save's"
    want = describe({k: state[k] for k in ours})
    assert describe(ours) == want
    assert describe(torch.load(out, weights_only=True, mmap=True)) == want
    assert load_in_torch21([str(out)])[str(out)] == want


def test_tied_model_pt_holds_the_head_like_state_dict(tmp_path):
    """The seed's torch.save(model.state_dict()) of a tied model has lm_head.weight sharing the
    embedding's storage; the .pt has it too."""
    from transformers import AutoModelForCausalLM

    tied = FIXTURES / "models" / "gqa_7l_tied"
    out = tmp_path / "tied.pt"
    st_merge(tied, "-o", out)
    ours = torch.load(out, weights_only=True)
    sd = AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.bfloat16).state_dict()
    assert "lm_head.weight" in ours and describe(ours) == describe({k: sd[k] for k in ours})
    assert sorted(ours) == sorted(sd)
    assert ours["lm_head.weight"].data_ptr() == ours["model.embed_tokens.weight"].data_ptr()
    ref = tmp_path / "ref" / "tied.pt"
    ref.parent.mkdir()
    state = {k: v.clone() for k, v in ours.items() if k != "lm_head.weight"}
    ordered = {}
    for k in ours:
        ordered[k] = state["model.embed_tokens.weight"].detach() if k == "lm_head.weight" else state[k]
    torch.save(ordered, ref)
    assert masked(out) == masked(ref)
    assert load_in_torch21([str(out)])[str(out)] == describe(ours)


def test_resharded_dir_loads_in_transformers(tmp_path):
    out = tmp_path / "resharded"
    st_merge(MODEL, "-o", out, "--max-shard-size", "1MB")
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "generation_config.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    state = hf_state(MODEL)
    assert describe(hf_state(out)) == describe(state)
    manifest = [json.loads(l) for l in (out / "st-merge.manifest.jsonl").read_text().splitlines()]
    assert {m["path"] for m in manifest} == set(files) - {"st-merge.manifest.jsonl"}
    torch.testing.assert_close(logits(out), logits(MODEL), rtol=0, atol=0)


def test_single_safetensors_fp32_filters_and_renames(tmp_path):
    out = tmp_path / "x.safetensors"
    st_merge(MODEL, "-o", out, "--dtype", "fp32", "--exclude", "*.mlp.*", "--rename", "^model.=m.")
    got = load_file(out)
    state = hf_state(MODEL)
    want = {
        ("m." + k[len("model."):] if k.startswith("model.") else k): v.float()
        for k, v in state.items()
        if ".mlp." not in k
    }
    assert describe(got) == describe(want)
    # fp32 -> bf16 comes back exactly, and a .pt input (our own output) works as input.
    back = tmp_path / "back.pt"
    st_merge(out, "-o", back, "--dtype", "bf16", "--rename", "^m.=model.")
    sd = torch.load(back, weights_only=True)
    assert describe(sd) == describe({k: state[k] for k in sd})


def test_several_inputs_and_deepspeed_module_dicts(tmp_path):
    state = hf_state(MODEL)
    names = list(state)
    torch.save({"module": {k: state[k] for k in names[:10]}, "global_steps": 3}, tmp_path / "ds.pt")
    save_file({k: state[k].contiguous() for k in names[10:]}, tmp_path / "rest.safetensors")
    out = tmp_path / "joined"
    st_merge(tmp_path / "ds.pt", tmp_path / "rest.safetensors", "-o", out)
    assert describe(dir_state(out)) == describe(state)
    # A name in two inputs is refused.
    p = st_merge(MODEL, tmp_path / "rest.safetensors", "-o", tmp_path / "dup", check=False)
    assert p.returncode == 2 and "two tensors would be called" in p.stderr
    assert not (tmp_path / "dup").exists()


# ------------------------------------------------------------------------------------------------
# LoRA


def make_peft_adapter(path, base=MODEL, dtype=torch.bfloat16, **cfg):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    config = LoraConfig(init_lora_weights=False, **cfg)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(path))
    return peft_model


def reference_merge(state, adapter_dir, scale_of, dora=False):
    """fp32 merge of every LoRA pair into its base tensor: name -> (fp32 result, fp32 noise bound)."""
    ad = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for k in ad:
        if not k.endswith(".lora_A.weight"):
            continue
        module = k[len("base_model.model."):-len(".lora_A.weight")]
        a = ad[k].float()
        b = ad[k.replace("lora_A", "lora_B")].float()
        w = state[module + ".weight"].float()
        delta = scale_of(module) * (b @ a)
        merged = w + delta
        noise = 1e-6 * (w.abs() + delta.abs())
        if dora:
            m = ad[k.replace("lora_A.weight", "lora_magnitude_vector")].float()
            factor = (m / torch.linalg.norm(merged, dim=1)).view(-1, 1)
            merged = factor * merged
            noise = noise * factor.abs() + 1e-6 * merged.abs()
        out[module + ".weight"] = (merged, noise)
    return out


def check_against_reference(out, out32, state, want, extra=()):
    """bf16 output within 1 ulp of the fp32 merge, and exactly the fp32 output rounded once."""
    got, got32 = dir_state(out), dir_state(out32)
    assert sorted(got) == sorted(state)
    assert len(want) > 0
    for k, v in got.items():
        if k in want:
            assert v.dtype == torch.bfloat16 and got32[k].dtype == torch.float32
            assert within_one_bf16_ulp(v, *want[k]), k
            assert torch.equal(v, got32[k].to(torch.bfloat16)), f"{k} was not rounded once"
            assert not torch.equal(v, state[k]), f"{k} did not change"
        elif k not in extra:
            assert torch.equal(v, state[k]), k


def peft_logits(adapter_dir, base=MODEL, dtype=torch.float32):
    """Logits (computed in fp32) of PEFT's own merge_and_unload of a model loaded in `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return logits(merged.float())


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_lora_merge_matches_fp32_and_peft(tmp_path, rslora):
    adapter = tmp_path / "adapter"
    r, alpha = 8, 16
    make_peft_adapter(adapter, r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora,
                      modules_to_save=["lm_head"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is rslora and cfg["init_lora_weights"] is False
    scale = alpha / r ** 0.5 if rslora else alpha / r
    out, out32 = tmp_path / "merged", tmp_path / "merged32"
    st_merge(MODEL, "--lora", adapter, "-o", out, "--max-shard-size", "4MB")
    st_merge(MODEL, "--lora", adapter, "-o", out32, "--dtype", "fp32")
    state = hf_state(MODEL)
    want = reference_merge(state, adapter, lambda m: scale)
    assert len(want) == 6 * len(TARGETS)
    check_against_reference(out, out32, state, want, extra={"lm_head.weight"})
    # modules_to_save: lm_head comes from the adapter.
    saved = load_file(adapter / "adapter_model.safetensors")["base_model.model.lm_head.weight"]
    assert torch.equal(dir_state(out)["lm_head.weight"], saved.to(torch.bfloat16))
    # The merged model computes what PEFT's merged model computes (in fp32, where PEFT does not
    # round twice).
    ref = peft_logits(adapter)
    torch.testing.assert_close(logits(out32), ref, rtol=1e-4, atol=1e-4)
    # In bf16, st-merge lands at least as close to the exact model as PEFT's bf16 merge does.
    ours = (logits(out) - ref).abs().mean().item()
    peft_bf16 = (peft_logits(adapter, dtype=torch.bfloat16) - ref).abs().mean().item()
    print(f"mean |logit error| in bf16: st-merge {ours:.3g}, PEFT {peft_bf16:.3g}")
    assert ours <= peft_bf16 * 1.05


def test_dora_merge_matches_fp32_and_peft(tmp_path):
    adapter = tmp_path / "dora"
    make_peft_adapter(adapter, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      use_dora=True)
    out, out32 = tmp_path / "merged", tmp_path / "merged32"
    st_merge(MODEL, "--lora", adapter, "-o", out)
    st_merge(MODEL, "--lora", adapter, "-o", out32, "--dtype", "fp32")
    state = hf_state(MODEL)
    want = reference_merge(state, adapter, lambda m: 2.0, dora=True)
    assert len(want) == 18
    check_against_reference(out, out32, state, want)
    torch.testing.assert_close(logits(out32), peft_logits(adapter), rtol=1e-4, atol=1e-4)


def test_embedding_lora_merge_matches_peft(tmp_path):
    """LoRA on the embedding (lora_embedding_A/B, delta = (B @ A)^T) next to a linear target."""
    adapter = tmp_path / "emb"
    make_peft_adapter(adapter, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    names = load_file(adapter / "adapter_model.safetensors").keys()
    assert any(n.endswith("embed_tokens.lora_embedding_A") for n in names)
    out32 = tmp_path / "merged32.safetensors"
    st_merge(MODEL, "--lora", adapter, "-o", out32, "--dtype", "fp32", "--manifest", "-")
    got, state = load_file(out32), hf_state(MODEL)
    ad = load_file(adapter / "adapter_model.safetensors")
    a = ad["base_model.model.model.embed_tokens.lora_embedding_A"].float()
    b = ad["base_model.model.model.embed_tokens.lora_embedding_B"].float()
    want = state["model.embed_tokens.weight"].float() + (b @ a).T
    torch.testing.assert_close(got["model.embed_tokens.weight"], want, rtol=0, atol=1e-6)
    d = tmp_path / "merged32"
    d.mkdir()
    shutil.copy(MODEL / "config.json", d)
    shutil.move(out32, d / "model.safetensors")
    torch.testing.assert_close(logits(d), peft_logits(adapter), rtol=1e-4, atol=1e-4)


def test_deepspeed_lora_checkpoint(tmp_path):
    """A DeepSpeed LoRA checkpoint as the Snowflake ds-llama LoRA layers save it: the frozen
    base weight next to lora_weight_1 (A, [r, in]) and lora_weight_2 (B, [out, r]) under
    {"module": ...}; scale = lora_alpha / lora_r."""
    state = hf_state(MODEL)
    r, alpha = 4, 32
    torch.manual_seed(1)
    module, want = {}, {}
    for k, w in state.items():
        module[k] = w
        if any(f".{t}." in k for t in ("q_proj", "v_proj", "up_proj")):
            stem = k[: -len(".weight")]
            a = torch.randn(r, w.shape[1]) * 0.1
            b = torch.randn(w.shape[0], r) * 0.1
            module[f"{stem}.lora_weight_1.weight"] = a.to(torch.bfloat16)
            module[f"{stem}.lora_weight_2.weight"] = b.to(torch.bfloat16)
            delta = alpha / r * (b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float())
            want[k] = (w.float() + delta, 1e-6 * (w.float().abs() + delta.abs()))
    ckpt = tmp_path / "global_step10"
    ckpt.mkdir()
    torch.save({"module": module, "global_steps": 10}, ckpt / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("global_step10")

    p = st_merge(MODEL, "--lora", tmp_path, "-o", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "--lora-alpha" in p.stderr
    assert not (tmp_path / "nope").exists()

    out = tmp_path / "merged.pt"
    st_merge(MODEL, "--lora", ckpt / "mp_rank_00_model_states.pt", "--lora-alpha", alpha,
             "--lora-r", r, "-o", out)
    got = torch.load(out, weights_only=True)
    assert sorted(got) == sorted(state)
    for k, v in got.items():
        if k in want:
            assert within_one_bf16_ulp(v, *want[k]), k
            assert not torch.equal(v, state[k]), k
        else:
            assert torch.equal(v, state[k]), k
    # Same through the checkpoint directory (found via `latest`), and the logits follow.
    out_dir = tmp_path / "merged_dir"
    st_merge(MODEL, "--lora", tmp_path, "--lora-alpha", alpha, "--lora-r", r, "-o", out_dir,
             "--dtype", "fp32")
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    with torch.no_grad():
        for k, p_ in ref_model.named_parameters():
            if k in want:
                a = module[k.replace(".weight", ".lora_weight_1.weight")].float()
                b = module[k.replace(".weight", ".lora_weight_2.weight")].float()
                p_.add_(alpha / r * (b @ a))
    torch.testing.assert_close(logits(out_dir), logits(ref_model), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, the right exit code, nothing written


def one_line_error(p, code, *needles):
    assert p.returncode == code, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("st-merge: error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_adapter_for_another_model_is_refused(tmp_path):
    adapter = tmp_path / "mha_adapter"
    make_peft_adapter(adapter, base=MHA, r=4, lora_alpha=8, target_modules=["k_proj"])
    out = tmp_path / "out"
    p = st_merge(MODEL, "--lora", adapter, "-o", out, check=False)
    one_line_error(p, 2, "k_proj", "another model")
    assert not out.exists()
    # An adapter whose target the model does not have.
    ad = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("k_proj", "kv_proj"): v for k, v in ad.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    p = st_merge(MODEL, "--lora", adapter, "-o", out, check=False)
    one_line_error(p, 2, "kv_proj.weight", "has no such tensor")
    assert not out.exists()


def test_broken_checkpoints_are_refused(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(MODEL, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    p = st_merge(broken, "-o", out, check=False)
    one_line_error(p, 1, "model.layers.99.mlp.up_proj.weight")
    assert not out.exists()
    # A shard the index names is missing.
    shutil.rmtree(broken)
    shutil.copytree(MODEL, broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    p = st_merge(broken, "-o", out, check=False)
    one_line_error(p, 2, "model-00002-of-00003.safetensors")
    # A truncated shard.
    shutil.copy(MODEL / "model-00002-of-00003.safetensors", broken)
    shard = broken / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    p = st_merge(broken, "-o", out, check=False)
    one_line_error(p, 1, "model-00003-of-00003.safetensors")
    # A truncated .pt.
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.ones(1000)}, pt)
    pt.write_bytes(pt.read_bytes()[:2000])
    p = st_merge(pt, "-o", tmp_path / "y.safetensors", check=False)
    one_line_error(p, 1, "x.pt")
    assert list(tmp_path.glob("y.safetensors*")) == [] and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_mixed_dtypes_and_existing_outputs(tmp_path):
    state = hf_state(MODEL)
    names = list(state)
    save_file({k: state[k].contiguous() for k in names[:5]}, tmp_path / "a.safetensors")
    save_file({k: state[k].float().contiguous() for k in names[5:]}, tmp_path / "b.safetensors")
    out = tmp_path / "ab.safetensors"
    p = st_merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", out, check=False)
    one_line_error(p, 2, "mix float dtypes", "--dtype")
    assert not out.exists()
    st_merge(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", out, "--dtype", "bf16")
    assert describe(load_file(out)) == describe(state)
    # The output exists: refused and untouched, unless --force.
    before = out.read_bytes()
    p = st_merge(MODEL, "-o", out, check=False)
    one_line_error(p, 2, "already exists", "--force")
    assert out.read_bytes() == before
    st_merge(MODEL, "-o", out, "--force", "--include", "model.norm.weight")
    assert list(load_file(out)) == ["model.norm.weight"]
    d = tmp_path / "d"
    st_merge(MODEL, "-o", d)
    p = st_merge(MODEL, "-o", d, check=False)
    one_line_error(p, 2, "already exists")
    st_merge(MODEL, "-o", d, "--force", "--dtype", "fp32")
    assert describe(dir_state(d)) == describe({k: v.float() for k, v in state.items()})
    # config.json says what the weights now are; otherwise byte for byte.
    config = (d / "config.json").read_text()
    assert json.loads(config)["dtype"] == "float32"
    assert config.replace('"float32"', '"bfloat16"') == (MODEL / "config.json").read_text()
    # Writing over an input is refused even with --force.
    p = st_merge(tmp_path / "a.safetensors", "-o", tmp_path / "a.safetensors", "--force", check=False)
    one_line_error(p, 2, "overwrite input")


def test_help_and_dry_run(tmp_path):
    h = run([ST_MERGE, "--help"]).stdout
    assert "Exit status:" in h and "Examples:" in h and "--lora" in h
    p = st_merge(MODEL, "-o", tmp_path / "plan", "--dry-run", "--max-shard-size", "2MB")
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert len(rows) == len(hf_state(MODEL)) and all("shard" in r for r in rows)
    assert not (tmp_path / "plan").exists()
