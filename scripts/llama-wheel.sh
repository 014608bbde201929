#!/usr/bin/env bash
# Builds llama-cpp-python once for a portable CPU baseline and installs it into a venv.
#
# Why this exists: llama.cpp builds with GGML_NATIVE=ON by default, i.e. for the build
# machine's CPU. Such a wheel died with SIGILL (AVX-512/AMX opcodes) on a machine of the same
# kind with another CPU, and pip's wheel cache is keyed by the sdist, not by CMAKE_ARGS, so a
# native wheel cached once is reused by every later install. So we never let pip build or cache
# it: we build it ourselves with explicit flags, keep the wheel in a cache of our own whose
# directory name carries the version, the Python tag and a hash of the flags, and install that
# exact file.
#
#   scripts/llama-wheel.sh install VENV_PYTHON   build if missing, install if not installed
#   scripts/llama-wheel.sh build VENV_PYTHON     build if missing, print the wheel's path
#   scripts/llama-wheel.sh dir VENV_PYTHON       print the cache directory for these flags
#
# Environment:
#   LLAMA_CPP_VERSION      the llama-cpp-python release (default below; flags were verified on it)
#   LLAMA_CPU              portable (default) | native (only for benchmarks/bench_llama_build.py)
#   VOICEMESH_WHEEL_CACHE  where built wheels live (default ~/.cache/voicemesh/wheels)
set -euo pipefail

action=${1:?usage: llama-wheel.sh install|build|dir VENV_PYTHON}
py=${2:?usage: llama-wheel.sh install|build|dir VENV_PYTHON}
version=${LLAMA_CPP_VERSION:-0.3.36}
cpu=${LLAMA_CPU:-portable}
root=${VOICEMESH_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/voicemesh/wheels}

# The baseline: x86-64-v3 (Haswell, 2013, and every x86-64 server CPU since), i.e. AVX2, FMA,
# F16C and BMI2, with every AVX-512 and AMX variant switched off explicitly. A CPU older than
# that gets x86-64-v2 (SSE4.2, no AVX). llama.cpp's runtime-dispatch build
# (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS) was rejected: its x86 feature check reads CPUID
# only (ggml-cpu/arch/x86/cpu-feats.cpp, no XGETBV), so on a VM that reports AMX without
# enabling tile state it would pick the AMX variant and die the same way.
off="-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
off+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX_VNNI=OFF"
machine=$(uname -m)
if [[ $cpu == native ]]; then
  level=native
  flags="-DGGML_NATIVE=ON"
elif [[ $machine != x86_64 ]]; then
  level=generic
  flags="-DGGML_NATIVE=OFF"
elif grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && grep -qw bmi2 /proc/cpuinfo; then
  level=x86-64-v3
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON $off"
else
  level=x86-64-v2
  echo "llama-wheel: this CPU has no AVX2; building for x86-64-v2 (SSE4.2), which is slower" >&2
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_BMI2=OFF $off"
fi
# The multimodal (mtmd/llava) library is imported lazily and never used by voicemesh.
flags+=" -DLLAVA_BUILD=OFF"
pytag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
hash=$(printf '%s' "$flags" | sha256sum | cut -c1-12)
dir="$root/llama-cpp-python-$version-$pytag-$machine-$level-$hash"

find_wheel() { compgen -G "$dir/llama_cpp_python-*.whl" | head -n1 || true; }

tmp=""
trap '[[ -z $tmp ]] || rm -rf "$tmp"' EXIT

build() {
  local wheel
  wheel=$(find_wheel)
  if [[ -n $wheel ]]; then
    echo "$wheel"
    return
  fi
  mkdir -p "$root"
  tmp=$(mktemp -d "$root/.build-XXXXXX")
  echo "llama-wheel: building llama-cpp-python $version for $level (once; ~10 min on 2 cores)" >&2
  echo "llama-wheel: CMAKE_ARGS=$flags" >&2
  local start=$SECONDS
  # --no-cache-dir: neither read a wheel pip built earlier (maybe native) nor write ours into
  # pip's cache under the sdist's name. --no-binary: build from the sdist, never take a wheel.
  CMAKE_ARGS="$flags" FORCE_CMAKE=1 "$py" -m pip wheel --no-cache-dir --no-deps \
    --no-binary llama-cpp-python --progress-bar off -w "$tmp/out" \
    "llama-cpp-python==$version" >"$tmp/build.log" 2>&1 || {
      tail -n 40 "$tmp/build.log" >&2
      echo "llama-wheel: the llama-cpp-python build failed (log above); it needs gcc, g++, cmake" \
           "and the Python headers" >&2
      exit 1
    }
  printf '%s\n' "$flags" >"$tmp/out/CMAKE_ARGS"
  # A rename is atomic: a build cut short never leaves a half-written cache entry.
  mv "$tmp/out" "$dir"
  echo "llama-wheel: built in $((SECONDS - start)) s into $dir" >&2
  find_wheel
}

case $action in
  dir) echo "$dir" ;;
  build) build ;;
  install)
    wheel=$(build)
    # Reinstall unless the installed llama_cpp came from this very file (pip records the file
    # URL in direct_url.json), so a native build installed earlier is replaced.
    if "$py" - "$wheel" <<'EOF'
import json, sys
from importlib.metadata import PackageNotFoundError, distribution
try:
    url = json.loads(distribution("llama-cpp-python").read_text("direct_url.json") or "{}")
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if url.get("url", "") == "file://" + sys.argv[1] else 1)
EOF
    then
      echo "llama-wheel: portable llama-cpp-python already installed ($level)" >&2
    else
      "$py" -m pip install --no-cache-dir --no-deps --force-reinstall --progress-bar off "$wheel"
    fi
    ;;
  *) echo "usage: llama-wheel.sh install|build|dir VENV_PYTHON" >&2; exit 2 ;;
esac
