"""A record over 4 GiB (zip64 extras, 24-byte descriptors, saturated central-directory fields): our rewrite is
byte-identical to torch.save and loads with mmap in torch 2.1.2 and 2.15."""
import hashlib
import zipfile

import torch

from conftest import load_in_torch21, run


def masked_digest(path):
    """sha256 of the file with the serialization_id payload and its two CRC fields zeroed, streamed."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".data/serialization_id"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, x = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + n + x
        f.seek(0)
        data_len = f.seek(0, 2)
        f.seek(0)
        h = hashlib.sha256()
        pos = 0
        while pos < start:
            chunk = f.read(min(64 << 20, start - pos))
            h.update(chunk)
            pos += len(chunk)
        rest = bytearray(f.read())
    rest[0:40] = b"0" * 40
    rest[44:48] = bytes(4)  # descriptor CRC
    name = info.filename.encode()
    entry = rest.rindex(name) - 46
    rest[entry + 16:entry + 20] = bytes(4)  # central directory CRC
    h.update(rest)
    assert pos + len(rest) == data_len
    return h.hexdigest()


def test_over_4gib(tmp_path, ptconv):
    big = torch.zeros(2**32 + 100, dtype=torch.uint8)
    big[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    big[-3:] = torch.tensor([7, 8, 9], dtype=torch.uint8)
    ref = tmp_path / "big.pt"
    torch.save({"big": big, "small": torch.arange(5, dtype=torch.int16)}, ref)
    del big
    out = tmp_path / "out" / "big.pt"
    out.parent.mkdir()
    run([ptconv, "rewrite", ref, out])
    assert masked_digest(out) == masked_digest(ref)
    ref.unlink()
    got = torch.load(out, weights_only=True, mmap=True)
    assert got["big"].shape == (2**32 + 100,)
    assert got["big"][:4].tolist() == [1, 2, 3, 4] and got["big"][-3:].tolist() == [7, 8, 9]
    assert got["small"].tolist() == [0, 1, 2, 3, 4]
    del got
    rows = load_in_torch21([str(out)])[str(out)]
    assert rows["small"][1] == [5] and rows["big"][1] == [2**32 + 100]
