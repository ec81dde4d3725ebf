"""The NxD training-checkpoint xser layout we write (TensorReference pickles, tensor_<i>.pt, .info.pt) loads the
way NxD loads it: torch 2.1.2 with weights_only=False and torch_xla's TensorReference class importable, and
torch 2.15 with the class allow-listed; and we read it back equal."""
import json

import torch

from conftest import PY21, describe, run

# torch_xla is not installable here; NxD only needs the class to exist under its module path for unpickling.
STUB = r"""
import sys, types
mod = types.ModuleType("torch_xla.utils.serialization")
class TensorReference:
    def __init__(self, tid): self.tid = tid
mod.TensorReference = TensorReference
for name in ("torch_xla", "torch_xla.utils"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["torch_xla.utils.serialization"] = mod
"""

# xser.load as torch_xla implements it: load the reference file, then each tensor_<tid>.pt.
LOAD = STUB + r"""
import hashlib, json, os, torch
path = sys.argv[1]
kw = {"weights_only": False} if torch.__version__.startswith("2.1.") else {}
if not kw:
    torch.serialization.add_safe_globals([(TensorReference, "torch_xla.utils.serialization.TensorReference")])
ref = torch.load(path, **kw)
info = torch.load(path + ".info.pt", **kw)
out = {}
for name, r in ref.items():
    t = torch.load(os.path.join(path + ".tensors", f"tensor_{r.tid}.pt"), weights_only=True, mmap=True)
    assert info[r.tid]["dtype"] == t.dtype and tuple(info[r.tid]["shape"]) == tuple(t.shape)
    assert info[r.tid]["expert_model_parallel"] is False
    flat = t.contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    out[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), list(t.stride()), hashlib.sha256(data).hexdigest()]
print(json.dumps(out))
"""


def test_training_layout_loads_like_nxd(tmp_path, ptconv):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"w": base.to(torch.bfloat16), "t": base.t(), "i": torch.tensor([1, -2, 3]), "s": torch.tensor(2.5)}
    src = tmp_path / "src.pt"
    torch.save(sd, src)
    main = tmp_path / "model" / "dp_rank_00_tp_rank_00_pp_rank_00.pt"
    main.parent.mkdir()
    run([ptconv, "to-xser-split", src, main])
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [main.name, main.name + ".info.pt", main.name + ".tensors"]
    want = {k: [v[0], v[1], list(torch.empty(v[1]).stride()), v[3]] for k, v in describe(sd).items()}
    import sys
    for python in (sys.executable, PY21):
        got = json.loads(run([python, "-c", LOAD, main]).stdout)
        assert got == want, python
    rows = {json.loads(l)["name"]: json.loads(l)["sha256"] for l in run([ptconv, "dump", main]).stdout.splitlines()}
    assert rows == {k: v[3] for k, v in want.items()}
