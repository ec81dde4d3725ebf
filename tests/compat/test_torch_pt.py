"""Our .pt reader and writer against real torch: byte-identical to torch 2.15's torch.save (but for the
serialization id), loadable by torch 2.1.2 and 2.15 with weights_only and mmap, and every torch-written
archive reads back equal."""
import json
import zipfile
from collections import OrderedDict

import pytest
import torch

from conftest import describe, load_in_torch21, run


def cases():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    shared = torch.tensor([0.0, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 257, generator=g).to(torch.bfloat16)
    return {
        "mixed": {
            "f32": base, "f32_row1": base[1], "f32_T": base.t(), "f32_slice": base[:, 1:3],
            "f16": torch.tensor([1.5, -2], dtype=torch.float16),
            "bf16": torch.tensor([1.5, -2], dtype=torch.bfloat16),
            "f64": torch.tensor([1.5, -2], dtype=torch.float64),
            "i64": torch.tensor([1, -2, 2**40]), "i32": torch.tensor([1, -2], dtype=torch.int32),
            "i16": torch.tensor([1, -2], dtype=torch.int16), "i8": torch.tensor([1, -2], dtype=torch.int8),
            "u8": torch.tensor([1, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
            "scalar0d": torch.tensor(3.5), "empty_0x5": torch.zeros(0, 5),
            "rg": torch.ones(2, requires_grad=True),
        },
        # Tied weights as state_dict() gives them: distinct tensor objects sharing one storage. (The very same
        # Python object saved twice pickles as a memo reference, which a reader of data cannot tell apart.)
        "shared": {"a": shared, "b": shared.detach(), "c": shared[2:]},
        "transposed_bf16": {"o_proj": big.t().clone().t(), "plain": big},
        "many_keys": {f"layer.{i}.w": torch.full((2,), float(i)) for i in range(1001)},
        "exactly_1000": {f"k{i}": torch.tensor([i]) for i in range(1000)},
        "big_ints": {"t": torch.arange(70000, dtype=torch.int64).reshape(7, 10000)},
        "bare_tensor": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
    }


def masked(path):
    """File bytes with the .data/serialization_id payload and its CRCs zeroed (readers never check it)."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".data/serialization_id"))
    # Local header: 30 bytes + name + extra, then the 40-digit payload and a data descriptor (sig, crc, ...).
    n = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    x = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + n + x
    data[start:start + 40] = b"0" * 40
    assert data[start + 40:start + 44] == b"PK\x07\x08"
    data[start + 44:start + 48] = bytes(4)
    # Central directory entry: its CRC sits 16 bytes after the entry signature.
    name = info.filename.encode()
    entry = data.rindex(name) - 46
    assert data[entry:entry + 4] == b"PK\x01\x02"
    data[entry + 16:entry + 20] = bytes(4)
    return bytes(data)


@pytest.mark.parametrize("name", list(cases()))
def test_rewrite_is_byte_identical_and_loads_everywhere(tmp_path, ptconv, name):
    obj = cases()[name]
    ref = tmp_path / f"{name}.pt"
    ours = tmp_path / "out" / f"{name}.pt"
    ours.parent.mkdir()
    torch.save(obj, ref)
    run([ptconv, "rewrite", ref, ours])
    assert masked(ours) == masked(ref), "our archive differs from torch.save's"
    with zipfile.ZipFile(ours) as z:
        assert z.testzip() is None  # real CRCs
    want = describe(obj)
    for kw in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        got = torch.load(ours, **kw)
        assert describe(got) == want
        if isinstance(obj, dict):
            assert list(got) == list(obj)
            for k in obj:
                assert got[k].requires_grad == obj[k].requires_grad
    assert load_in_torch21([str(ours)])[str(ours)] == want


@pytest.mark.parametrize("name", list(cases()))
def test_reader_matches_torch_load(tmp_path, ptconv, name):
    obj = cases()[name]
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    rows = [json.loads(line) for line in run([ptconv, "dump", path]).stdout.splitlines()]
    got = {r["name"]: [r["dtype"], r["shape"], r["strides"], r["sha256"]] for r in rows}
    assert got == describe(obj)


def test_reads_torch21_archives(tmp_path, ptconv):
    """torch 2.1.2 writes data/* in string order and no .format_version: the reader must not care."""
    script = "import torch,sys; b=torch.arange(12.).reshape(3,4); torch.save({f'k{i}': b[i % 3] * i for i in range(12)} | {'t': b.t()}, sys.argv[1])"
    path = tmp_path / "t21.pt"
    run([__import__("conftest").PY21, "-c", script, path])
    rows = {json.loads(l)["name"]: json.loads(l)["sha256"] for l in run([ptconv, "dump", path]).stdout.splitlines()}
    want = {k: v[3] for k, v in load_in_torch21([str(path)])[str(path)].items()}
    assert rows == want
    out = tmp_path / "again.pt"
    run([ptconv, "rewrite", path, out])
    assert describe(torch.load(out, weights_only=True, mmap=True)) == describe(torch.load(path, weights_only=True))


def test_bad_inputs_get_one_line_errors(tmp_path, ptconv):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, good)
    data = good.read_bytes()
    bad = {}
    bad["truncated.pt"] = data[: len(data) // 2]
    bad["empty.pt"] = b""
    legacy = tmp_path / "legacy_src.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    bad["legacy.pt"] = legacy.read_bytes()
    import io, pickle
    bad["plain_pickle.pt"] = pickle.dumps({"a": 1})
    # A deflated archive (Python's zipfile) with the same records.
    buf = io.BytesIO()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    bad["deflated.pt"] = buf.getvalue()
    # A pickle that names os.system.
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("a/data.pkl", b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.")
        z.writestr("a/version", "3\n")
    bad["evil.pt"] = evil.getvalue()
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        p = run([ptconv, "dump", path], check=False)
        assert p.returncode == 2, (name, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0], (name, p.stderr)
        assert "panicked" not in p.stderr
    assert "os.system" in run([ptconv, "dump", tmp_path / "evil.pt"], check=False).stderr
    assert "compressed" in run([ptconv, "dump", tmp_path / "deflated.pt"], check=False).stderr
