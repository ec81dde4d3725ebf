"""`make demo`'s script runs the whole pipeline on the tiny model, offline, and leaves what it says it leaves;
a second run resumes (keeps every finished output)."""
import json
import os

from conftest import ROOT, run


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_"))}
    first = run(["bash", ROOT / "scripts" / "demo.sh", tmp_path], env=env)
    out = first.stdout
    assert "identical: 57 tensors, bit for bit" in out, out
    assert out.count("result: OK") == 3, out  # download, shard set, dataset
    shards = sorted((tmp_path / "nxd" / "tiny-llama3-tp4-pp4" / "model").glob("dp_rank_*.pt"))
    assert len(shards) == 16
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "data" / "corpus-1024"))
    assert len(ds) > 0 and all(len(r) == 1024 for r in ds[:3]["input_ids"])
    assert "--pretrained_weight 1" in (tmp_path / "pretrain.sbatch").read_text()
    manifest = [json.loads(l) for l in (tmp_path / "hf" / "tiny-llama3.manifest.jsonl").read_text().splitlines()]
    assert {r["path"] for r in manifest} >= {"config.json", "tokenizer.json", "model.safetensors.index.json"}

    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    second = run(["bash", ROOT / "scripts" / "demo.sh", tmp_path], env=env)
    assert "kept 16 existing" in second.stderr + second.stdout
    assert {p: p.stat().st_mtime_ns for p in shards} == mtimes
