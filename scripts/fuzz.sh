#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECONDS each, default 60), seeded with small valid inputs.
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the machine's stable toolchain accept them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$root/fuzz"
mkdir -p corpus/pickle corpus/pt_archive corpus/zip_directory corpus/safetensors_header corpus/manifest_lines
# Seeds: tiny real torch / safetensors files from the reference venv, and a manifest line.
bash "$root/scripts/setup-python.sh"
"$root/.venv/current/bin/python" - <<'PY'
import torch, zipfile, safetensors.torch as st
d = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "t": torch.arange(4.0).reshape(2, 2).t()}
torch.save(d, "corpus/pt_archive/seed.pt")
torch.save(d, "corpus/zip_directory/seed.pt")
open("corpus/pickle/seed", "wb").write(zipfile.ZipFile("corpus/pt_archive/seed.pt").read("seed/data.pkl"))
st.save_file({"w": d["w"]}, "corpus/safetensors_header/seed.safetensors")
PY
printf '{"path":"a/b.pt","bytes":3,"sha256":"%064d"}\n' 0 > corpus/manifest_lines/seed
for target in pickle pt_archive zip_directory safetensors_header manifest_lines; do
  echo "fuzz: $target for ${seconds}s" >&2
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
