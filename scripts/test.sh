#!/usr/bin/env bash
# The project's test command (README: "Run the tests").
#
# Installs what the integration tests need when it is missing (Debian's
# `prometheus` and `buildah`, Python's `grpcio-tools` for the example
# client), builds the fake NVML library and the image's binary, then runs
# every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v buildah >/dev/null 2>&1 || need_apt+=(buildah) # tests/image.rs
if ((${#need_apt[@]})); then
  echo "test.sh: installing ${need_apt[*]} (apt-get)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import grpc_tools, grpc' >/dev/null 2>&1; then
  echo "test.sh: installing grpcio-tools (pip)" >&2
  # A distribution's own Python refuses installs outside a venv (PEP 668):
  # then install into the user's site, which the tests' python3 also reads.
  python3 -m pip install -q --disable-pip-version-check 'grpcio-tools>=1.60,<2' ||
    python3 -m pip install -q --disable-pip-version-check --user --break-system-packages 'grpcio-tools>=1.60,<2'
fi

# llama.cpp's llama-server for the tests that run a real engine on the CPU
# (tests/llama_cpp.rs, tests/proxy.rs): built from source once and cached under
# target/llama.cpp/ (README: "Run the tests"); a failed build stops here
# with its reason.
scripts/llama-server.sh >/dev/null

# The fake libnvidia-ml.so.1 that the NVML tests load through nvml-wrapper.
cargo build -q -p fake-nvml

# The container image's binary, built as the Containerfile builds it (the
# dist profile: release code, stripped); tests/image.rs puts it in an image
# built from scratch with buildah and runs it there.
cargo build -q --profile dist --bin gpuscale
GPUSCALE_IMAGE_BINARY="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/dist/gpuscale"
export GPUSCALE_IMAGE_BINARY

# Every test target; benchmarks are built by `cargo clippy --all-targets`
# and run with `cargo bench` (they measure, they do not assert).
targets=(--lib --bins --tests)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace "${targets[@]}" --no-fail-fast "$@"
else
  cargo test --workspace "${targets[@]}" --no-fail-fast "$@"
fi
cargo test -q --workspace --doc
