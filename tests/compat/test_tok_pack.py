"""tok-pack against the real Python pipeline: a faithful copy of NxD's examples/training/llama/get_dataset.py
(datasets load_dataset("json") -> map(tokenize, batched) with the AutoTokenizer of $FIXTURES/tokenizer ->
map(group_texts, batched) -> save_to_disk), run on a small corpus of real English text (scripts/make-corpus.py), in
NxD's pinned stack (datasets 3.6 + transformers 4.48) and in the current one (datasets 5.x).

Checked: --compat nxd writes the same files as the 3.6 pipeline byte for byte (the .arrow streams and
dataset_info.json; state.json except its run-specific fingerprint), for JSON lines, text, CSV, Parquet and several
shards; load_from_disk of ours equals the references of both stacks (features, schema, every value); token ids equal
the Python `tokenizers` ids on adversarial Unicode; default mode; determinism across --jobs; bad input gives
one-line errors with exit 2 and no output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from conftest import BIN, FIXTURES, ROOT, run

TOK_PACK = BIN / "tok-pack"
TOKENIZER = FIXTURES / "tokenizer"
# A Python with datasets 3.6 (NxD's pin), made by scripts/setup-python.sh.
PY_DATASETS3 = os.environ.get("PY_DATASETS3", str(ROOT / ".venv" / "datasets36" / "bin" / "python"))

# Loads datasets with load_from_disk and prints, per path, [version, rows, features, table class, sha256 of the table
# written as a metadata-free Arrow stream].
TABLE_DIGEST = r"""
import hashlib, json, sys
import datasets, pyarrow as pa

def digest(table):
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=1000)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()

out = {}
for path in sys.argv[1:]:
    ds = datasets.load_from_disk(path)
    feats = {k: [type(v).__name__, str(getattr(v, "feature", v).dtype)] for k, v in ds.features.items()}
    out[path] = [datasets.__version__, len(ds), feats, type(ds.data).__name__, digest(ds.data.table)]
print(json.dumps(out))
"""


def table_digests(python, *paths):
    p = run([python, "-c", TABLE_DIGEST, *paths])
    return json.loads(p.stdout)
# tokenizers 0.22 (the reference code) and tokenizers 1.0.0-rc.3's pipeline encoder: both must give the same ids.
ENCODERS = ["reference", "fast"]
PY = sys.executable

# get_dataset.py, verbatim except: the corpus is a local file (JSON lines, or another datasets loader), block_size,
# save_path and the loader are arguments, save_to_disk may get a max_shard_size (NxD passes none: default 500MB), and
# the script is a function so that all reference runs share one interpreter.
REFERENCE = r'''
import os, sys, json
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer

def get_dataset(corpus, tokenizer_path, save_path, block_size, max_shard_size, loader):

    raw_datasets = load_dataset(loader, data_files={"train": corpus})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    column_names = raw_datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    tokenized_datasets = raw_datasets.map(
        tokenize_function,
        batched=True,
        remove_columns=column_names,
        load_from_cache_file=True,
        desc="Running tokenizer on dataset",
    )

    if block_size > tokenizer.model_max_length:
        print("block_size > tokenizer.model_max_length")
    block_size = min(block_size, tokenizer.model_max_length)

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized_datasets.map(
        group_texts,
        batched=True,
        load_from_cache_file=True,
        desc=f"Grouping texts in chunks of {block_size}",
    )

    train_dataset = lm_datasets["train"]
    print(len(train_dataset))
    if max_shard_size:
        train_dataset.save_to_disk(save_path, max_shard_size=max_shard_size)
    else:
        train_dataset.save_to_disk(save_path)


for job in json.loads(sys.argv[1]):
    get_dataset(*job)
'''

# Adversarial Unicode documents: combining marks, ZWJ emoji sequences, RTL, CJK, astral planes, controls,
# lone surrogate-free oddities, special-token lookalikes, whitespace runs, apostrophe contractions, digits.
ADVERSARIAL = [
    "",
    " ",
    "\n\n\n",
    "\t \t\r\n  x",
    "e\u0301 \u00e9 \u1e9b\u0323 A\u030a \u212b",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202eevil\u202c text",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4",
    "\U00010348\U0001d11e\U0001f600\U000e0041\U0010fffd",
    "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\u0085\u2028\u2029",
    "<|begin_of_text|>hello<|end_of_text|> <|eot_id|><|start_header_id|>",
    "I'M you'LL they'Re it's we'VE she'd   don't",
    "1234567890 12.5e-3 \u0661\u0662\u0663 \u2160\u2161 \u00bd",
    "   leading and trailing   ",
    "a" * 5000,
    "\u00a0\u2003\u3000nbsp\u200b\ufeffzero width",
    "Ǆ ǅ ǆ İ ı ß ẞ ﬁ",
    "\ud7ff\ue000\uf8ff\ufffd\ufffe",
    "line1\rline2\r\nline3\n",
    "mixed \U0001f1fa\U0001f1f8 flags \U0001f1ef\U0001f1f5 and keycaps 1\ufe0f\u20e3",
    "x\u0300\u0301\u0302\u0303\u0304\u0305\u0306\u0307\u0308\u0309\u030a" * 20,
    "\U0001f600" * 300 + "  \n \t\n" * 50,
    "'s's 'S 'll'LL '' '  's",
    "   \n\n   \r\n\r\n \u00a0\n",
    "Ελληνικά Кириллица ქართული हिन्दी தமிழ் ไทย ລາວ ᠮᠣᠩᠭᠣᠯ",
    "<|end_of_text|><|end_of_text|>x<|reserved_special_token_5|>",
    "9999999999999 0.000001 1,000,000 ١٢٣٤٥",
]


def ref_env(tmp):
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp / "hf"), HF_DATASETS_CACHE=str(tmp / "hf" / "datasets"), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="true",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    return env


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """About 1.5 MB of real English text, split into paragraphs (several thousand documents, so several 1000-doc
    batches), with the adversarial documents mixed in."""
    d = tmp_path_factory.mktemp("corpus")
    raw = d / "raw.jsonl"
    run([PY, ROOT / "scripts" / "make-corpus.py", raw, "--mb", "1.5", "--meta"])
    out = d / "corpus.jsonl"
    n = 0
    with raw.open() as f, out.open("w") as g:
        for line in f:
            doc = json.loads(line)
            for i, para in enumerate(doc["text"].split("\n\n")):
                g.write(json.dumps({"id": f"{doc['id']}-{i}", "title": doc["title"], "text": para}) + "\n")
                n += 1
                if n % 700 == 0:
                    adv = ADVERSARIAL[(n // 700) % len(ADVERSARIAL)]
                    g.write(json.dumps({"id": f"adv-{n}", "title": "adv", "text": adv}) + "\n")
                    n += 1
    assert n > 3000, n
    return out


def reference_runs(python, tmp, jobs):
    """Runs get_dataset.py for every job (name -> (corpus, block, max_shard_size, loader)) in one interpreter."""
    spec = [[str(src), str(TOKENIZER), str(tmp / name), block, shard, loader]
            for name, (src, block, shard, loader) in jobs.items()]
    run([python, "-c", REFERENCE, json.dumps(spec)], env=ref_env(tmp))
    return {name: tmp / name for name in jobs}


@pytest.fixture(scope="session")
def references(tmp_path_factory, corpus, formats):
    """The Python pipeline's datasets in NxD's stack (datasets 3.6, transformers 4.48), by name."""
    return reference_runs(PY_DATASETS3, tmp_path_factory.mktemp("references"), {
        "8192": (corpus, 8192, None, "json"),
        "128-1MB": (corpus, 128, "1MB", "json"),
        "txt": (formats / "c.txt", 64, None, "text"),
        "csv": (formats / "c.csv", 64, None, "csv"),
        "parquet": (formats / "c.parquet", 64, None, "parquet"),
    })


@pytest.fixture(scope="session")
def references_current(tmp_path_factory, corpus):
    """The same pipeline in the current stack (datasets 5.x), which writes "List" where 3.6 writes "Sequence"."""
    return reference_runs(PY, tmp_path_factory.mktemp("references-current"), {"8192": (corpus, 8192, None, "json")})


def assert_identical_files(ours, ref):
    """The same files with the same bytes; state.json may differ only in its fingerprint (a hash of the Python
    process's cache paths, which nobody can reproduce)."""
    names = sorted(p.name for p in Path(ours).iterdir())
    assert names == sorted(p.name for p in Path(ref).iterdir())
    for name in names:
        a, b = (Path(ours) / name).read_bytes(), (Path(ref) / name).read_bytes()
        if name == "state.json":
            fp_a, fp_b = json.loads(a)["_fingerprint"], json.loads(b)["_fingerprint"]
            a, b = a.replace(fp_a.encode(), b"X"), b.replace(fp_b.encode(), b"X")
        assert a == b, f"{name} differs from the reference's"


def tok_pack(*args, check=True):
    return run([TOK_PACK, "--tokenizer", TOKENIZER, *args], check=check)


def read_stream(path):
    with pa.memory_map(str(path)) as src:
        reader = ipc.open_stream(src)
        return reader.schema, reader.read_all()


def features_as_sequence(features):
    """datasets 5.x writes "List" where 3.x (and we) write "Sequence"."""
    return json.loads(json.dumps(features).replace('"_type": "List"', '"_type": "Sequence"'))


def assert_same_dataset(ours, ref):
    import datasets

    a, b = datasets.load_from_disk(str(ours)), datasets.load_from_disk(str(ref))
    assert a.features == b.features
    assert a.column_names == b.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(a) == len(b) > 0
    ta, tb = a.data.table, b.data.table
    assert ta.schema.remove_metadata() == tb.schema.remove_metadata()
    assert ta.combine_chunks().equals(tb.combine_chunks())
    # Memory-mapped like the reference (a ConcatenationTable of memory-mapped tables for several shards).
    assert type(a.data).__name__ == type(b.data).__name__ in ("MemoryMappedTable", "ConcatenationTable")
    # Row for row through the Python objects NxD's loader sees.
    for i in (0, len(a) // 2, len(a) - 1):
        assert a[i] == b[i]

    # The files.
    names = sorted(p.name for p in Path(ours).iterdir())
    assert names == sorted(p.name for p in Path(ref).iterdir())
    sa, sb = (json.loads((Path(d) / "state.json").read_text()) for d in (ours, ref))
    assert len(sa.pop("_fingerprint")) == 16
    sb.pop("_fingerprint")
    assert sa == sb
    text_a = (Path(ours) / "state.json").read_text()
    text_b = (Path(ref) / "state.json").read_text()
    fp_a, fp_b = json.loads(text_a)["_fingerprint"], json.loads(text_b)["_fingerprint"]
    assert text_a.replace(fp_a, "X") == text_b.replace(fp_b, "X"), "state.json differs beyond the fingerprint"
    ia, ib = (json.loads((Path(d) / "dataset_info.json").read_text()) for d in (ours, ref))
    assert ia["features"] == features_as_sequence(ib["features"])
    assert '"Sequence"' in json.dumps(ia) and '"List"' not in json.dumps(ia)
    for k in ("citation", "description", "homepage", "license"):
        assert ia[k] == ib[k] == ""
    for f in sa["_data_files"]:
        fa, fb = Path(ours) / f["filename"], Path(ref) / f["filename"]
        assert fa.read_bytes()[:4] == b"\xff\xff\xff\xff" and fa.read_bytes()[-8:] == b"\xff\xff\xff\xff\0\0\0\0"
        (sch_a, tab_a), (sch_b, tab_b) = read_stream(fa), read_stream(fb)
        assert sch_a.remove_metadata() == sch_b.remove_metadata()
        meta_a = json.loads(sch_a.metadata[b"huggingface"])
        meta_b = json.loads(sch_b.metadata[b"huggingface"])
        assert meta_a == features_as_sequence(meta_b)
        assert tab_a.equals(tab_b)
    return a


def test_compat_nxd_equals_reference(tmp_path, corpus, references, references_current):
    ref, block = references["8192"], 8192
    for encoder in ENCODERS:
        ours = tmp_path / f"ours-{encoder}"
        tok_pack("--input", corpus, "--output", ours, "--block-size", block, "--compat", "nxd", "-q",
                 "--encoder", encoder)
        ds = assert_same_dataset(ours, ref)
        assert all(len(r) == block for r in ds[:5]["input_ids"])
        assert_identical_files(ours, ref)
        assert_same_dataset(ours, references_current["8192"])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_compat_nxd_shards_like_save_to_disk(tmp_path, corpus, references, encoder):
    """Block 128 with save_to_disk(max_shard_size="1MB"): several shards, split like datasets does."""
    ref = references["128-1MB"]
    ours = tmp_path / "ours"
    tok_pack("--input", corpus, "--output", ours, "--block-size", 128, "--compat", "nxd", "--max-shard-size", "1MB",
             "-q", "--manifest", tmp_path / "m.jsonl", "--encoder", encoder)
    assert len(list(ours.glob("data-*.arrow"))) > 1
    ds = assert_same_dataset(ours, ref)
    assert all(len(r) == 128 for r in ds[:5]["input_ids"])
    assert_identical_files(ours, ref)
    manifest = [json.loads(l) for l in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in manifest) == sorted(p.name for p in ours.iterdir())


@pytest.fixture(scope="session")
def formats(tmp_path_factory):
    """The same small corpus as JSON lines, text, CSV and Parquet."""
    d = tmp_path_factory.mktemp("formats")
    run([PY, ROOT / "scripts" / "make-corpus.py", d / "c.jsonl", "--mb", "0.4", "--meta",
         "--format", "jsonl,txt,csv,parquet"])
    return d


@pytest.mark.parametrize("fmt,loader", [("txt", "text"), ("csv", "csv"), ("parquet", "parquet")])
def test_other_formats_equal_reference(tmp_path, formats, references, fmt, loader):
    src = formats / f"c.{fmt}"
    ref = references[fmt]
    ours = tmp_path / "ours"
    tok_pack("--input", src, "--output", ours, "--block-size", 64, "--compat", "nxd", "-q")
    assert_same_dataset(ours, ref)
    assert_identical_files(ours, ref)


def test_text_line_breaks_like_datasets(tmp_path):
    """datasets reads text in Python's text mode: "\r\n" and a lone "\r" end a line, U+2028, U+0085 and the other
    str.splitlines() breaks do not."""
    src = tmp_path / "breaks.txt"
    lines = ["one\r\ntwo\rthree\n\nfour\r\r\nfive\rsix\u2028seven\x0bx\x85 y\x0c\x1cz\n"]
    lines += [f"The quick brown fox {i} jumps over the lazy dog.\n" for i in range(300)]
    src.write_bytes("".join(lines).encode())
    ref = reference_runs(PY_DATASETS3, tmp_path, {"ref": (src, 16, None, "text")})["ref"]
    ours = tmp_path / "ours"
    tok_pack("--input", src, "--output", ours, "--block-size", 16, "--compat", "nxd", "-q")
    assert_identical_files(ours, ref)
    assert json.loads((ours / "dataset_info.json").read_text())["splits"]["train"]["num_examples"] == 308


def test_loads_in_datasets3_equal_to_reference(tmp_path, corpus, references):
    """datasets 3.6 (NxD's pin) loads ours (single shard, several shards, empty) memory-mapped, with Sequence
    features and the reference's values."""
    ours = {}
    for name, block, extra in [("8192", 8192, []), ("128-1MB", 128, ["--max-shard-size", "1MB"])]:
        ours[name] = tmp_path / name
        tok_pack("--input", corpus, "--output", ours[name], "--block-size", block, "--compat", "nxd", "-q", *extra)
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "a few tokens"}\n')
    tok_pack("--input", short, "--output", tmp_path / "empty", "--block-size", 8192, "--compat", "nxd", "-q")
    got = table_digests(PY_DATASETS3, *[str(p) for p in ours.values()], str(tmp_path / "empty"))
    want = table_digests(PY, *[str(references[n]) for n in ours])
    for name in ours:
        version, rows, feats, kind, digest = got[str(ours[name])]
        assert version.startswith("3.")
        _, ref_rows, ref_feats, _, ref_digest = want[str(references[name])]
        assert (rows, digest) == (ref_rows, ref_digest)
        assert feats == {"input_ids": ["Sequence", "int32"], "attention_mask": ["Sequence", "int8"],
                         "labels": ["Sequence", "int64"]}
        assert kind in ("MemoryMappedTable", "ConcatenationTable")
    assert got[str(tmp_path / "empty")][1] == 0


def test_deterministic_whatever_jobs(tmp_path, corpus):
    outs = []
    for jobs in (1, 2, 3):
        out = tmp_path / f"j{jobs}"
        tok_pack("--input", corpus, "--output", out, "--block-size", 256, "--jobs", jobs, "-q")
        outs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outs[0] == outs[1] == outs[2]


def python_ids(texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]


def random_texts(seed, n):
    """Random strings drawn from ASCII, whitespace, Latin-1, combining marks, several scripts, CJK, emoji and
    the astral planes (no surrogates), in runs so that words form."""
    import random

    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF),
              (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x10000, 0x1007F), (0x2000, 0x206F), (0xFE00, 0xFE0F),
              (0xFFF0, 0xFFFD), (0xE0000, 0xE007F)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 12)):
            lo, hi = rng.choice(ranges)
            chars.extend(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))
            if rng.random() < 0.5:
                chars.append(rng.choice([" ", "  ", "\n", " \n", "'s", "'", "\r\n", "\t"]))
        out.append("".join(chars))
    return out


def test_adversarial_unicode_ids_equal_python_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    texts = ADVERSARIAL + [a + " " + b for a, b in zip(ADVERSARIAL, reversed(ADVERSARIAL))] + random_texts(0, 3000)
    src = tmp_path / "adv.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = python_ids(texts)
    auto = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert [auto(t)["input_ids"] for t in texts] == expected
    import datasets

    for encoder in ENCODERS:
        out = tmp_path / f"out-{encoder}"
        # Block 1 with no EOS: every token is a row, nothing dropped.
        tok_pack("--input", src, "--output", out, "--block-size", 1, "--no-eos", "-q", "--encoder", encoder)
        got = [r[0] for r in datasets.load_from_disk(str(out))["input_ids"]]
        assert got == [i for ids in expected for i in ids], encoder


def test_default_mode_concatenates_with_eos(tmp_path, corpus):
    import datasets

    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ids = python_ids(texts)
    eos = 128001
    stream = []
    for i, doc in enumerate(ids):
        if i:
            stream.append(eos)
        stream.extend(doc)
    block = 1000
    out = tmp_path / "out"
    p = tok_pack("--input", corpus, "--output", out, "--block-size", block)
    assert f"{len(stream) // block} rows" in p.stderr, p.stderr
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == len(stream) // block
    flat = ds.data.table.column("input_ids").combine_chunks().flatten().to_pylist()
    assert flat == stream[: len(ds) * block]
    assert ds.data.table.column("labels").combine_chunks().flatten().to_pylist() == flat
    assert set(ds.data.table.column("attention_mask").combine_chunks().flatten().to_pylist()) == {1}

    out2 = tmp_path / "noeos"
    tok_pack("--input", corpus, "--output", out2, "--block-size", block, "--no-eos", "-q")
    flat2 = datasets.load_from_disk(str(out2)).data.table.column("input_ids").combine_chunks().flatten().to_pylist()
    nostream = [i for doc in ids for i in doc]
    assert flat2 == nostream[: len(nostream) // block * block]


def test_short_corpus_gives_loadable_empty_dataset(tmp_path):
    import datasets

    src = tmp_path / "short.jsonl"
    src.write_text('{"text": "just a few tokens"}\n')
    out = tmp_path / "out"
    p = tok_pack("--input", src, "--output", out, "--block-size", 8192, "--compat", "nxd")
    assert "0 rows" in p.stderr
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 0 and list(ds.features) == ["input_ids", "attention_mask", "labels"]


@pytest.mark.parametrize("case", ["utf8", "column", "empty", "tokenizer", "block0", "exists", "notjson", "missing"])
def test_bad_input_one_line_error_exit_2(tmp_path, case):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    out = tmp_path / "out"
    tok = TOKENIZER
    block = "128"
    expect = ""
    if case == "utf8":
        src.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
        expect = "in.jsonl:2: invalid UTF-8"
    elif case == "column":
        src.write_text('{"body": "hello"}\n')
        expect = 'no "text" column'
    elif case == "empty":
        src.write_text("")
        expect = "no documents"
    elif case == "tokenizer":
        tok = tmp_path / "badtok"
        tok.mkdir()
        (tok / "tokenizer.json").write_text("{not json")
        expect = "tokenizer"
    elif case == "block0":
        block = "0"
        expect = "block-size"
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        expect = "already exists"
    elif case == "notjson":
        src.write_text('{"text": "ok"}\nnot json\n')
        expect = "in.jsonl:2"
    elif case == "missing":
        src = tmp_path / "nope.jsonl"
        expect = "nope.jsonl"
    p = run([TOK_PACK, "--tokenizer", tok, "--input", src, "--output", out, "--block-size", block], check=False)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tok-pack: error:") and expect in lines[0], p.stderr
    if case == "exists":
        assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("mode", [["--compat", "nxd"], []])
def test_rank_world_merge_equals_single_process(tmp_path, corpus, mode):
    single = tmp_path / "single"
    tok_pack("--input", corpus, "--output", single, "--block-size", 512, "--max-shard-size", "1MB", *mode, "-q")
    assert len(list(single.glob("data-*.arrow"))) > 1
    out = tmp_path / "multi"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for r in (2, 0, 1):
        run([TOK_PACK, "--tokenizer", TOKENIZER, "--input", corpus, "--output", out, "--block-size", 512, *mode,
             "--max-shard-size", "1MB", "--rank", r, "--world", 3, "-q"], env=env)
    parts = sorted(tmp_path.glob("multi.rank-*-of-00003"))
    assert len(parts) == 3 and not out.exists()
    # An incomplete set is refused.
    p = tok_pack("--merge", *parts[:2], "--output", out, check=False)
    assert p.returncode == 2 and "ranks" in p.stderr and not out.exists(), p.stderr
    # The ranks' --max-shard-size is recorded in their partial results and used by the merge.
    tok_pack("--merge", *parts, "--output", out, "-q")
    a = {p.name: p.read_bytes() for p in single.iterdir()}
    b = {p.name: p.read_bytes() for p in out.iterdir()}
    assert a == b


def test_compressed_inputs_and_directories(tmp_path, formats):
    """gzip and zstd compressed files, and a directory of files (read in name order), give the same dataset."""
    import gzip
    import shutil

    plain = formats / "c.jsonl"
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    zst = tmp_path / "c.jsonl.zst"
    run(["zstd", "-q", "-o", zst, plain]) if shutil.which("zstd") else None
    d = tmp_path / "dir"
    d.mkdir()
    lines = plain.read_text().splitlines(keepends=True)
    (d / "a.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (d / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[len(lines) // 2 :]).encode()))
    (d / "notes.md").write_text("ignored")
    outs = {}
    for name, src in [("plain", plain), ("gz", gz), ("zst", zst), ("dir", d)]:
        if not src.exists():
            continue
        out = tmp_path / f"out-{name}"
        tok_pack("--input", src, "--output", out, "--block-size", 64, "--compat", "nxd", "-q")
        outs[name] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(outs) >= 3
    # dataset_info.json names the input files and their sizes on disk; the raw table they hold is the same.
    infos = {name: json.loads(o.pop("dataset_info.json")) for name, o in outs.items()}
    assert all(o == outs["plain"] for o in outs.values())
    assert list(infos["dir"]["download_checksums"]) == [str(d / "a.jsonl"), str(d / "b.jsonl.gz")]
    assert infos["gz"]["download_size"] == gz.stat().st_size
    for info in infos.values():
        assert (info["dataset_size"], info["splits"]) == (infos["plain"]["dataset_size"], infos["plain"]["splits"])


def test_datasets_directory_and_arrow_inputs(tmp_path, formats):
    """A datasets save_to_disk directory (several shards) and its .arrow files give the dataset its JSON lines give."""
    plain = formats / "c.jsonl"
    saved = tmp_path / "saved"
    script = ("import sys, datasets; datasets.load_dataset('json', data_files={'train': sys.argv[1]})['train']"
              ".save_to_disk(sys.argv[2], max_shard_size='100KB')")
    run([PY, "-c", script, plain, saved], env=ref_env(tmp_path))
    shards = sorted(saved.glob("data-*.arrow"))
    assert len(shards) > 1
    outs = {}
    for name, src in [("plain", [plain]), ("dir", [saved]), ("arrow", shards)]:
        out = tmp_path / f"out-{name}"
        tok_pack("--input", *src, "--output", out, "--block-size", 64, "--compat", "nxd", "-q")
        outs[name] = {p.name: p.read_bytes() for p in out.iterdir()}
    # dataset_info.json describes the raw table by its builder ("json" or "arrow"), files and sizes.
    infos = {name: json.loads(o.pop("dataset_info.json")) for name, o in outs.items()}
    assert outs["dir"] == outs["plain"] == outs["arrow"]
    assert infos["dir"] == infos["arrow"] and infos["arrow"]["builder_name"] == "arrow"
    assert infos["plain"]["splits"]["train"]["num_examples"] == infos["arrow"]["splits"]["train"]["num_examples"]
