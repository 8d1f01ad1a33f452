#!/usr/bin/env bash
# llama.cpp's `llama-server`, built once from source and cached under target/,
# for the integration tests that run a real inference engine on the CPU.
#
#   scripts/llama-server.sh              prints the path of the cached binary,
#                                        building it first when it is absent
#   scripts/llama-server.sh model DIR    writes a tiny random-weight Llama
#                                        model to DIR/tiny-llama.gguf and
#                                        prints its path
#   scripts/llama-server.sh source       prints the source directory (with
#                                        gguf-py/ and models/)
#
# The source is the llama.cpp tree vendored in the `llama-cpp-python` source
# distribution on PyPI (vendor/llama.cpp: tools/server, gguf-py, vocab-only
# GGUF files in models/), fetched with pip. Only the `llama-server` target is
# built: CMake (the `cmake` Python package when the machine has none) and a
# C++ compiler, LLAMA_BUILD_JOBS jobs (default 2). The cache is
# target/llama.cpp/<version>/; concurrent callers wait on a lock, so two
# test binaries may call this at once. Progress goes to stderr, the path
# alone to stdout.
#
# Environment: LLAMA_CPP_PYTHON_VERSION (default below), LLAMA_BUILD_JOBS.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="$root/target/llama.cpp/$version"
src="$cache/src"
bin="$cache/build/bin/llama-server"

say() { echo "llama-server.sh: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

pip_install() {
  # A distribution's own Python refuses installs outside a venv (PEP 668):
  # then install into the user's site, which the tests' python3 also reads.
  python3 -m pip install -q --disable-pip-version-check "$@" ||
    python3 -m pip install -q --disable-pip-version-check --user --break-system-packages "$@"
}

need_python() {
  command -v python3 >/dev/null 2>&1 || die "python3 is needed (to fetch the llama.cpp source with pip and to write the test model); install it (apt-get install python3 python3-pip)"
  python3 -m pip --version >/dev/null 2>&1 || die "pip is needed (python3 -m pip); install it (apt-get install python3-pip)"
}

fetch_source() {
  [ -f "$src/CMakeLists.txt" ] && [ -d "$src/gguf-py/gguf" ] && return 0
  need_python
  mkdir -p "$cache/dl"
  local sdist="$cache/dl/llama_cpp_python-$version.tar.gz"
  if [ ! -f "$sdist" ]; then
    say "fetching the llama-cpp-python $version source distribution (pip download)"
    python3 -m pip download -q --disable-pip-version-check --no-deps \
      --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$cache/dl" >&2 ||
      die "pip could not download llama-cpp-python==$version (is PyPI reachable?)"
  fi
  [ -f "$sdist" ] || die "pip did not leave $sdist"
  rm -rf "$src.tmp"
  mkdir -p "$src.tmp"
  tar -xzf "$sdist" -C "$src.tmp" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp" ||
    die "$sdist has no vendor/llama.cpp"
  rm -rf "$src"
  mv "$src.tmp" "$src"
}

build() {
  local cxx
  cxx="$(command -v c++ || command -v g++ || command -v clang++ || true)"
  [ -n "$cxx" ] || die "a C++ compiler is needed to build llama-server (apt-get install g++)"
  command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 ||
    die "make or ninja is needed to build llama-server (apt-get install make)"
  if ! command -v cmake >/dev/null 2>&1; then
    need_python
    say "installing CMake (pip install cmake)"
    pip_install 'cmake>=3.18' >&2 || die "could not install CMake with pip"
    hash -r
    command -v cmake >/dev/null 2>&1 ||
      die "CMake was installed with pip but is not on PATH (add ~/.local/bin to PATH)"
  fi
  fetch_source
  local jobs="${LLAMA_BUILD_JOBS:-2}" log="$cache/build.log" started
  started=$(date +%s)
  say "building llama-server ($jobs jobs; about 10 minutes on 2 cores; log: $log)"
  {
    cmake -S "$src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF &&
      cmake --build "$cache/build" --target llama-server -j "$jobs"
  } >"$log" 2>&1 || {
    tail -n 40 "$log" >&2
    die "building llama-server failed (full log: $log)"
  }
  [ -x "$bin" ] || die "the build finished but $bin is missing (log: $log)"
  say "built $bin in $(($(date +%s) - started)) s"
}

ensure_binary() {
  [ -x "$bin" ] && return 0
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  [ -x "$bin" ] || build
  flock -u 9
}

ensure_source() {
  [ -f "$src/CMakeLists.txt" ] && [ -d "$src/gguf-py/gguf" ] && return 0
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  fetch_source
  flock -u 9
}

case "${1:-}" in
  "")
    ensure_binary
    echo "$bin"
    ;;
  source)
    ensure_source
    echo "$src"
    ;;
  model)
    [ -n "${2:-}" ] || die "usage: $0 model DIR"
    ensure_source
    need_python
    if ! python3 -c 'import numpy, yaml' >/dev/null 2>&1; then
      say "installing numpy and PyYAML (pip), needed by gguf-py"
      pip_install 'numpy>=1.24' 'pyyaml>=5.1' >&2 || die "could not install numpy and PyYAML with pip"
    fi
    mkdir -p "$2"
    out="$2/tiny-llama.gguf"
    python3 "$root/scripts/tiny_llama_gguf.py" --gguf-py "$src/gguf-py" \
      --vocab "$src/models/ggml-vocab-llama-spm.gguf" --out "$out" >&2 ||
      die "writing the tiny model failed"
    echo "$out"
    ;;
  *)
    die "unknown argument \`$1\`: no argument (the binary), \`model DIR\` or \`source\`"
    ;;
esac
