#!/usr/bin/env bash
# Set up the Python peers that roe's benchmarks compare against (see bench/peers/README.md):
# a virtual environment with sentence-transformers (+ torch), PEFT + gguf (transformers' GGUF
# loader), llama-cpp-python (built from source against the machine's CPU) and hnswlib (built
# from its sdist: PyPI has no wheel of 0.8.0), all pinned by bench/peers/requirements.lock.
#
#   scripts/setup-peers.sh              # venv at ./.venv, or $ROE_PEERS_VENV
#   ROE_PEERS_VENV=/tmp/peers scripts/setup-peers.sh
#
# Idempotent: when the venv already holds exactly the pinned set (stamp = sha256 of the lock
# file + the python version) and the libraries import, nothing is done. Every step prints how
# long it took. Only PyPI (and Debian, for cmake when it is missing) is used.
#
# Environment:
#   ROE_PEERS_VENV       venv path (default: <repo>/.venv)
#   PYTHON               interpreter for the venv (default: python3)
#   ROE_PEERS_FORCE=1    reinstall even if the stamp matches
#   ROE_PEERS_CMAKE_ARGS CMake args for llama.cpp (default: a portable AVX2/FMA/F16C build,
#                        the instruction set roe's own kernels use; -DGGML_NATIVE=ON built
#                        on an AVX-512 host crashed in llama_decode, see bench/peers/README.md)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ROE_PEERS_VENV:-$here/.venv}"
lock="$here/bench/peers/requirements.lock"
python="${PYTHON:-$(command -v python3 || command -v python)}"
jobs="$(nproc 2>/dev/null || echo 2)"

t_all=$(date +%s.%N)
step_start() { t0=$(date +%s.%N); echo "==> $*"; }
elapsed() { "$python" -c "import sys;print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }
step_end() { echo "    done in $(elapsed "$t0") s"; }

cmake_args="${ROE_PEERS_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
stamp_want="$(sha256sum "$lock" | cut -d' ' -f1) $("$python" -c 'import sys;print("%d.%d.%d"%sys.version_info[:3])') cmake:$cmake_args"
stamp_file="$venv/.roe-peers-stamp"

check_imports() {
  "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import gguf, hnswlib, llama_cpp, peft, sentence_transformers, torch, transformers  # noqa: F401
print("    " + ", ".join(f"{p} {md.version(p)}" for p in
      ("sentence-transformers", "torch", "transformers", "tokenizers", "llama_cpp_python", "numpy",
       "peft", "gguf", "hnswlib")))
PY
}

if [[ "${ROE_PEERS_FORCE:-0}" != "1" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
  step_start "check existing venv $venv"
  if check_imports; then
    step_end
    echo "ok      peers already set up in $venv (total $(elapsed "$t_all") s)"
    exit 0
  fi
  echo "    existing venv is broken; reinstalling"
fi

# 1. Build tools for llama.cpp. llama-cpp-python's build backend (scikit-build-core) can fetch
#    cmake from PyPI on its own, but we prefer the system one; install it only when missing.
step_start "build tools (cmake, C/C++ compiler)"
if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    echo "    cmake or c++ missing: apt-get install cmake build-essential"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends cmake build-essential >/dev/null
  else
    echo "    cmake missing and apt-get unusable (not root?): relying on scikit-build-core's PyPI cmake" >&2
  fi
fi
echo "    cmake: $(cmake --version 2>/dev/null | head -1 || echo none), c++: $(c++ --version 2>/dev/null | head -1 || echo none)"
step_end

# 2. The venv itself.
step_start "venv at $venv"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24" wheel
step_end

# 3. torch + sentence-transformers + peft + gguf, binary wheels only. PyPI serves only one
#    Linux x86_64 torch wheel per version (built with CUDA, with nvidia-* wheels as
#    dependencies); the CPU-only "+cpu" builds live on another index that is not reachable
#    here, and torch will not import without the nvidia libraries, so the default set is
#    accepted (see README: ~4.5 GB).
step_start "pip install sentence-transformers + torch + peft + gguf (pinned, wheels only)"
grep -v -e '^llama[-_]cpp[-_]python' -e '^hnswlib' "$lock" >"$venv/.roe-peers-wheels.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
  -r "$venv/.roe-peers-wheels.txt"
step_end

# 4. llama-cpp-python from its sdist: compiles llama.cpp with CMake (~15 minutes on 2 cores).
step_start "pip install llama-cpp-python (builds llama.cpp from source)"
export CMAKE_ARGS="$cmake_args"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
echo "    CMAKE_ARGS=$CMAKE_ARGS, $jobs jobs"
grep '^llama[-_]cpp[-_]python' "$lock" >"$venv/.roe-peers-llama.txt"
# pip's wheel cache does not key on CMAKE_ARGS: always build with the flags asked for (this step
# only runs when the stamp, which holds them, differs).
nocache=(--no-cache-dir --force-reinstall)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${nocache[@]}" \
  -r "$venv/.roe-peers-llama.txt"
step_end

# 5. hnswlib from its sdist (C++ with pybind11, ~25 s): built against the numpy, pybind11 and
#    setuptools installed above (no isolated build environment: that would fetch unpinned ones).
step_start "pip install hnswlib (builds from source)"
grep '^hnswlib' "$lock" >"$venv/.roe-peers-hnswlib.txt"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --no-build-isolation -r "$venv/.roe-peers-hnswlib.txt"
step_end

# 6. Check.
step_start "import check"
check_imports
"$venv/bin/python" -m pip check >/dev/null || "$venv/bin/python" -m pip check >&2 || true
echo "$stamp_want" >"$stamp_file"
step_end

echo "    venv size: $(du -sh "$venv" | cut -f1)"
echo "ok      peers set up in $venv (total $(elapsed "$t_all") s)"
