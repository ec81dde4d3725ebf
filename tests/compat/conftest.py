"""Shared helpers for the compat tests: they run our binaries on files and check them with the real libraries.

Environment (set by `make test-compat`): BIN = target/release, FIXTURES = generated fixtures dir,
PY21 = the torch 2.1.2 interpreter.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("BIN", ROOT / "target" / "release"))
FIXTURES = Path(os.environ.get("FIXTURES", ROOT / "fixtures"))
PY21 = os.environ.get("PY21", str(ROOT / ".venv" / "torch21" / "bin" / "python"))
EXAMPLES = BIN / "examples"


def run(cmd, check=True, **kw):
    """Runs a command, capturing text output; fails the test with its stderr when `check` and it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stderr}")
    return p


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's logical row-major bytes (what `ptconv dump` prints)."""
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


# Loads files in torch 2.1.2 (a separate interpreter) and prints {path: {name: [dtype, shape, stride, sha256]}}.
LOAD_21 = r"""
import hashlib, json, sys, torch
out = {}
for path in sys.argv[1:]:
    sd = torch.load(path, weights_only=True, mmap=True)
    if isinstance(sd, torch.Tensor):
        sd = {"": sd}
    rows = {}
    for k, t in sd.items():
        flat = t.contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        rows[k] = [str(t.dtype).replace("torch.", ""), list(t.shape), list(t.stride()), hashlib.sha256(data).hexdigest()]
    out[path] = rows
print(json.dumps(out))
"""


def load_in_torch21(paths):
    p = run([PY21, "-c", LOAD_21, *paths])
    return json.loads(p.stdout)


def describe(sd):
    if isinstance(sd, torch.Tensor):
        sd = {"": sd}
    return {
        k: [str(t.dtype).replace("torch.", ""), list(t.shape), list(t.stride()), tensor_digest(t)]
        for k, t in sd.items()
    }


@pytest.fixture(scope="session")
def ptconv():
    exe = EXAMPLES / "ptconv"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run `make build` first")
    return exe


sys.path.insert(0, str(Path(__file__).parent))
