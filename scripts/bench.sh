#!/usr/bin/env bash
# Runs every benchmark and rewrites BENCHMARKS.md with the measured figures (never run as a test).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="$root/BENCHMARKS.md"
tmp="$(mktemp)"
{
  echo "# Benchmarks"
  echo
  echo "Measured by \`make bench\` on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(date -u +%Y-%m-%d)."
  echo "Every figure comes from the command shown; rerun it to reproduce."
  echo
  echo "## Strided-copy engine (lib/tensor-formats) next to memcpy"
  echo
  echo "Command: \`cargo run --release -p tensor-formats --example copy_bench\`. In-memory source and sink, so this"
  echo "measures the engine alone; the memcpy row is the physical limit for the same bytes."
  echo
  "$root/target/release/examples/copy_bench"
} > "$tmp"
mv "$tmp" "$out"
echo "bench: wrote $out" >&2
