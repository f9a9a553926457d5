#!/usr/bin/env bash
# Create (or reuse) the Python environment that provides libtorch for tch, and wire it into cargo.
#
# - The venv lives outside the checkout, in $ALLOC_MOE_CACHE (default ~/.cache/alloc-moe), so every
#   clone and every CI run on this machine reuses it. It holds torch==2.11.0 (what tch 0.24.0 expects)
#   plus the pinned packages for the golden-test and data scripts (requirements.txt).
# - `libtorch` in the repo root is a symlink to the venv's torch package; .cargo/config.toml points
#   LIBTORCH at it, so plain `cargo build/test/run` works.
# - torch-sys runs `python3` from PATH, so callers put the venv's bin first on PATH (the Makefile does).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${ALLOC_MOE_CACHE:-$HOME/.cache/alloc-moe}
venv=$cache/venv-torch-2.11.0
req=$root/scripts/requirements.txt
stamp=$venv/.alloc-moe-requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)

if [ ! -x "$venv/bin/python3" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating $venv (torch 2.11.0 is ~4.6 GB; the first time takes a few minutes)" >&2
  mkdir -p "$cache"
  # Build into a temporary directory and rename, so an interrupted install never looks complete.
  tmp=$venv.partial.$$
  rm -rf "$tmp"
  python3 -m venv "$tmp"
  "$tmp/bin/python3" -m pip install --quiet --upgrade pip
  "$tmp/bin/python3" -m pip install --quiet -r "$req"
  echo "$want" > "$tmp/.alloc-moe-requirements.sha256"
  rm -rf "$venv"
  mv "$tmp" "$venv"
  # venv scripts hard-code their interpreter path; recreate the links for the final location.
  python3 -m venv --upgrade "$venv" >/dev/null
fi

torch_dir=$("$venv/bin/python3" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" "$root/libtorch"
echo "setup: libtorch -> $torch_dir" >&2
