#!/usr/bin/env bash
# A small virtual environment with the official `openai` Python client, for the test that
# drives `roe serve`'s HTTP API with it (cli/tests/http_api.rs runs cli/tests/openai_client.py
# with .venv-openai/bin/python), and openapi-spec-validator, which checks the API description
# (http/src/openapi.rs). Idempotent: an environment with the pinned versions is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ROE_OPENAI_VENV:-$here/.venv-openai}"
pins=(openai==3.51.0 openapi-spec-validator==0.7.2)
pin="${pins[*]}"
python="${PYTHON:-$(command -v python3 || command -v python)}"

if [[ -x "$venv/bin/python" && "$(cat "$venv/.pinned" 2>/dev/null)" == "$pin" ]]; then
  echo "ok      $pin (already in $venv)"
  exit 0
fi
echo "venv    $venv ($pin)"
rm -rf "$venv"
if "$python" -m venv "$venv" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
else
  # No venv module (e.g. Debian without python3-venv): the packages in a folder of their
  # own, and a bin/python that puts it on the path.
  echo "note    $python has no working venv module; installing into $venv/site instead"
  rm -rf "$venv"
  mkdir -p "$venv/bin"
  "$python" -m pip install --quiet --disable-pip-version-check --target "$venv/site" "${pins[@]}"
  printf '#!/bin/sh\nPYTHONPATH="%s/site${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' \
    "$venv" "$python" > "$venv/bin/python"
  chmod +x "$venv/bin/python"
fi
echo "$pin" > "$venv/.pinned"
"$venv/bin/python" -c 'import openai, openapi_spec_validator; print("ok      openai", openai.__version__)'
