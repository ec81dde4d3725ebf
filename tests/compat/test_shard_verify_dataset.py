"""shard-verify on Hugging Face datasets directories: what tok-pack writes and what the real `datasets`
save_to_disk writes pass; a missing, stray, truncated or corrupt data file, rows of another length, token ids
outside the vocabulary, labels that differ from input_ids and a row count disagreeing with the manifest are each
caught with exit 1 and the file named."""
import json
import shutil

import datasets
import pytest

from conftest import BIN, FIXTURES, ROOT, run

SHARD_VERIFY = BIN / "shard-verify"
TOK_PACK = BIN / "tok-pack"
BLOCK = 128
VOCAB = 128256


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    corpus = tmp / "corpus.jsonl"
    run([ROOT / ".venv" / "current" / "bin" / "python", ROOT / "scripts" / "make-corpus.py", "--mb", "0.3", corpus])
    out = tmp / "ds"
    run([TOK_PACK, "--tokenizer", FIXTURES / "tokenizer", "--input", corpus, "--output", out,
         "--block-size", BLOCK, "--max-shard-size", "100KB", "--manifest", tmp / "ds.manifest.jsonl", "-q"])
    assert len(list(out.glob("*.arrow"))) > 1
    return out, tmp / "ds.manifest.jsonl"


def verify(path, *args):
    p = run([SHARD_VERIFY, path, "--json", "-q", *args], check=False)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def damaged(packed, tmp_path):
    ds, manifest = packed
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy)
    return copy, manifest, sorted(copy.glob("*.arrow"))


def messages(report):
    return [(p["files"], p["message"]) for p in report["problems"]]


def test_tok_pack_output_passes_with_manifest_block_and_vocab(packed):
    ds, manifest = packed
    code, r = verify(ds, "--block-size", BLOCK, "--vocab-size", VOCAB, "--manifest", manifest)
    assert code == 0, r["problems"]
    assert r["mode"] == "dataset"
    assert [c["status"] for c in r["checks"]] == ["passed", "passed", "passed"]
    rows = sum(len(datasets.Dataset.from_file(str(f))) for f in ds.glob("*.arrow"))
    assert f"{rows} rows of {BLOCK} tokens" in r["checks"][1]["detail"]


def test_real_save_to_disk_passes_and_its_damage_is_caught(tmp_path):
    ids = [[(i * 7 + j) % 1000 for j in range(BLOCK)] for i in range(50)]
    good = datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * BLOCK] * 50, "labels": ids},
        features=datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
            "labels": datasets.Sequence(datasets.Value("int64")),
        }))
    good.save_to_disk(str(tmp_path / "good"), num_shards=2)
    assert verify(tmp_path / "good", "--block-size", BLOCK, "--vocab-size", 1000)[0] == 0

    # Token ids beyond the vocabulary, a short row, labels that are not input_ids: each named with its row.
    bad_ids = [row[:] for row in ids]
    bad_ids[3][5] = 5000
    short = [row[:] for row in ids]
    short[7] = short[7][:-1]
    for name, data, want in [
        ("vocab", {"input_ids": bad_ids, "labels": bad_ids}, "row 3: token id 5000 outside the vocabulary"),
        ("labels", {"input_ids": ids, "labels": bad_ids}, "row 3: labels differ from input_ids"),
        ("short", {"input_ids": short, "labels": short}, f"row 7: {BLOCK - 1} tokens, expected blocks of {BLOCK}"),
    ]:
        d = datasets.Dataset.from_dict({**data, "attention_mask": [[1] * len(r) for r in data["input_ids"]]})
        d.save_to_disk(str(tmp_path / name))
        code, r = verify(tmp_path / name, "--vocab-size", 1000)
        assert code == 1, name
        assert any(want in m for _, m in messages(r)), (name, messages(r))


def test_missing_stray_truncated_and_corrupt_files_are_named(packed, tmp_path):
    ds, manifest, files = damaged(packed, tmp_path)
    files[0].unlink()
    shutil.copy(files[1], ds / "data-00099-of-00100.arrow")
    with open(files[1], "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    code, r = verify(ds)
    assert code == 1
    got = messages(r)
    assert ([files[0].name], "missing (listed in state.json)") in got
    assert any(f == ["data-00099-of-00100.arrow"] and m.startswith("stray") for f, m in got)
    assert any(f == [files[1].name] and "truncated or corrupt" in m for f, m in got)

    ds2, _, files2 = damaged(packed, tmp_path / "b")
    files2[0].write_bytes(b"\0" * 64)
    code, r = verify(ds2)
    assert code == 1
    assert any(f == [files2[0].name] and ("Arrow IPC stream" in m or "truncated" in m) for f, m in messages(r))


def test_manifest_row_counts_and_digests(packed, tmp_path):
    ds, manifest, files = damaged(packed, tmp_path)
    records = [json.loads(l) for l in manifest.read_text().splitlines()]
    for r in records:
        if r["path"] == files[0].name:
            r["rows"] += 1
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, r = verify(ds, "--manifest", tmp_path / "m.jsonl")
    assert code == 1
    assert any("rows, the manifest says" in m for _, m in messages(r)), messages(r)
    (ds / "state.json").write_text("{}")
    code, r = verify(ds, "--manifest", manifest)
    assert code == 1
    got = messages(r)
    assert any(f == ["state.json"] and ("sha256 differs" in m or "size" in m) for f, m in got), got
    assert any(f == ["state.json"] and "_data_files" in m for f, m in got), got


def test_record_writes_a_manifest_tok_pack_agrees_with(packed, tmp_path):
    ds, manifest = packed
    run([SHARD_VERIFY, ds, "--record", tmp_path / "rec.jsonl", "-q"])
    ours = {json.loads(l)["path"]: json.loads(l) for l in (tmp_path / "rec.jsonl").read_text().splitlines()}
    theirs = {json.loads(l)["path"]: json.loads(l) for l in manifest.read_text().splitlines()}
    assert ours == theirs
