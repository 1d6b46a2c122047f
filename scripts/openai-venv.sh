#!/usr/bin/env bash
# A small virtual environment with the official `openai` Python client, for the test that
# drives `roe serve`'s HTTP API with it (cli/tests/http_api.rs runs cli/tests/openai_client.py
# with .venv-openai/bin/python). Idempotent: an environment with the pinned version is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ROE_OPENAI_VENV:-$here/.venv-openai}"
pin="openai==3.51.0"
python="${PYTHON:-$(command -v python3 || command -v python)}"

if [[ -x "$venv/bin/python" && "$(cat "$venv/.pinned" 2>/dev/null)" == "$pin" ]]; then
  echo "ok      $pin (already in $venv)"
  exit 0
fi
echo "venv    $venv ($pin)"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$pin"
echo "$pin" > "$venv/.pinned"
"$venv/bin/python" -c 'import openai; print("ok      openai", openai.__version__)'
