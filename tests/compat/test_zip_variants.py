"""Archives that torch accepts but does not write itself (other zip writers, other layouts) read back as
torch.load reads them. Built here with Python's zipfile from a real torch.save archive."""
import io
import json
import zipfile

import pytest
import torch

from conftest import describe, run


def records(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rebuild(recs, rename=lambda n: n, order=None, **zip_kw):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, **zip_kw) as z:
        for name, data in (order(recs) if order else recs):
            z.writestr(zipfile.ZipInfo(rename(name)), data)
    return buf.getvalue()


def variants(src):
    recs = records(src)
    prefix = recs[0][0].split("/")[0]
    return {
        # Python's zipfile: sizes and CRC in the local header, no data descriptors, no padding, no zip64 end.
        "pyzip_stored": rebuild(recs),
        "case_insensitive": rebuild(recs, rename=lambda n: n.replace("data.pkl", "DATA.PKL").replace("/version", "/VERSION").replace("/data/", "/Data/")),
        "version_first": rebuild(recs, order=lambda r: sorted(r, key=lambda x: not x[0].endswith("/version"))),
        "data_first": rebuild(recs, order=lambda r: sorted(r, key=lambda x: "/data/" not in x[0])),
        "prefix_weird": rebuild(recs, rename=lambda n: n.replace(prefix + "/", "some.weird-name_123/", 1)),
        "minimal": rebuild([r for r in recs if r[0].endswith(("data.pkl", "/version")) or "/data/" in r[0]]),
        "zip64_everywhere": rebuild(recs, allowZip64=True),
    }


@pytest.mark.parametrize("variant", ["pyzip_stored", "case_insensitive", "version_first", "data_first", "prefix_weird", "minimal", "zip64_everywhere"])
def test_variants_read_like_torch(tmp_path, ptconv, variant):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = tmp_path / "src.pt"
    torch.save({"a": base, "t": base.t(), "b": torch.tensor([1, 2, 3]), "h": torch.tensor([1.5], dtype=torch.bfloat16)}, src)
    path = tmp_path / f"{variant}.pt"
    path.write_bytes(variants(src)[variant])
    want = describe(torch.load(path, weights_only=True))
    rows = [json.loads(l) for l in run([ptconv, "dump", path]).stdout.splitlines()]
    assert {r["name"]: [r["dtype"], r["shape"], r["strides"], r["sha256"]] for r in rows} == want
    # And our re-save of it is a normal torch archive again.
    out = tmp_path / "out" / "x.pt"
    out.parent.mkdir()
    run([ptconv, "rewrite", path, out])
    assert describe(torch.load(out, weights_only=True, mmap=True)) == want


def test_nested_prefix_is_refused_like_torch(tmp_path, ptconv):
    src = tmp_path / "src.pt"
    torch.save({"a": torch.ones(2)}, src)
    path = tmp_path / "nested.pt"
    path.write_bytes(rebuild(records(src), rename=lambda n: "a/" + n))
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    r = run([ptconv, "dump", path], check=False)
    assert r.returncode == 2 and "nested.pt" in r.stderr
