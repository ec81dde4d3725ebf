#!/usr/bin/env bash
# Creates the Python reference environments the compat tests and benchmarks run against, from PyPI, pinned.
#   .venv/current : torch 2.15 (current) + transformers, safetensors, datasets, huggingface_hub, tokenizers, peft
#   .venv/torch21 : torch 2.1.2 (the Neuron SDK's torch) + safetensors
#   .venv/datasets36 : datasets 3.6 + transformers 4.48 (NxD's pins), get_dataset.py as NxD runs it
#   .venv/hub036 : huggingface_hub 0.36 + hf_transfer (the last line that used it), for the hf-fetch benchmark
# Idempotent: a venv whose stamp matches the pins is left alone. Uses uv (from PyPI) for speed and its cache.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venvs="${VENV_ROOT:-$root/.venv}"
mkdir -p "$venvs"

current_pins=(
  "torch==2.15.0" "transformers==5.23.0" "safetensors==0.8.0" "datasets==5.2.0"
  "huggingface_hub==2.4.0" "tokenizers==0.23.3" "peft==0.21.2" "numpy" "pyarrow" "pytest==9.2.0"
)
torch21_pins=( "torch==2.1.2" "numpy<2" "safetensors==0.8.0" "pytest==9.2.0" )
# NxD's pins (datasets<=3.6.0, transformers 4.48): tok-pack's output must load there, and --compat nxd must
# equal what get_dataset.py writes there byte for byte.
datasets36_pins=( "datasets==3.6.0" "transformers==4.48.0" "pyarrow==26.0.1" )
# hf-fetch's benchmark compares with the last huggingface_hub that used hf_transfer.
hub036_pins=( "huggingface_hub==0.36.*" "hf_transfer==0.1.9" )

# uv lives in its own small venv so the system Python is never modified.
uv="$venvs/uv/bin/uv"
if [ ! -x "$uv" ]; then
  python3 -m venv "$venvs/uv"
  "$venvs/uv/bin/pip" install --quiet "uv==0.13.9"
fi

make_venv() { # name pins...
  local name="$1"; shift
  local dir="$venvs/$name" stamp
  stamp="$(printf '%s\n' "$@")"
  if [ -f "$dir/.pins" ] && [ "$(cat "$dir/.pins")" = "$stamp" ]; then
    return 0
  fi
  echo "setup-python: creating $dir ($*)" >&2
  rm -rf "$dir"
  "$uv" venv --quiet --python python3 "$dir"
  VIRTUAL_ENV="$dir" "$uv" pip install --quiet --python "$dir/bin/python" "$@"
  printf '%s\n' "$stamp" > "$dir/.pins"
}

make_venv current "${current_pins[@]}"
make_venv torch21 "${torch21_pins[@]}"
make_venv datasets36 "${datasets36_pins[@]}"
make_venv hub036 "${hub036_pins[@]}"
echo "setup-python: ready ($venvs/current, $venvs/torch21)" >&2
