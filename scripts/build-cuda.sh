#!/usr/bin/env bash
# Build camelid with CUDA, from a fresh clone, on a machine without a GPU.
#
#   scripts/build-cuda.sh            # the binary: target/cuda/release/camelid
#   scripts/build-cuda.sh --tests    # also the device-generic test binaries, packed with the
#                                    # binary into target/cuda/bundle.tar.xz for a GPU machine
#
# What it does (every step reuses its result on the next run):
#  1. pip-downloads NVIDIA's CUDA 13.0 wheels (compiler, headers, and the cuBLAS/cuBLASLt/cuRAND/
#     NVRTC/cudart libraries to link against) into $CAMELID_CUDA_CACHE
#     (default ~/.cache/camelid/cuda), outside the repository;
#  2. unpacks them into one toolkit tree (bin/nvcc, include/, lib/, nvvm/), adds the unversioned
#     library names the linker asks for, and compiles a stub libcuda.so (soname libcuda.so.1) from
#     the driver entry points cudarc declares: the driver comes with the GPU's machine, and the
#     stub only satisfies the linker here (it lives in lib/stubs and never travels);
#  3. builds `cargo build --release --features cuda` into target/cuda (the CPU build in
#     target/release stays valid), stripped, for compute capability $CUDA_COMPUTE_CAP (default 90:
#     H100/H200; there is no GPU here to ask). The stripped binary is ~70 MiB (~9 MB with xz).
#
# Pinned to CUDA 13.0.x: a newer nvcc emits PTX that the 580 driver rejects. The binary links
# libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 and
# libcudart.so.13 dynamically: the GPU machine must have them in its library path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CAMELID_CUDA_CACHE:-$HOME/.cache/camelid/cuda}"
WHEELS="$CACHE/wheels"
TREE="$CACHE/cuda-13.0"
TARGET_DIR="${CAMELID_CUDA_TARGET_DIR:-$ROOT/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
MAX_BYTES=$((64 * 1024 * 1024))

WITH_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument '$arg' (expected --tests or --help)" >&2; exit 2 ;;
  esac
done

# name==version, one a line. The compiler set is the one known to build candle 0.11.1's kernels;
# cublas/curand/nvrtc are the CUDA 13.0 update 2 releases matching nvcc 13.0.88.
PINS="nvidia-cuda-nvcc==13.0.88
nvidia-nvvm==13.0.88
nvidia-cuda-crt==13.0.88
nvidia-cuda-runtime==13.0.96
nvidia-cuda-cccl==13.0.85
nvidia-cuda-nvrtc==13.0.88
nvidia-cublas==13.0.2.14
nvidia-curand==10.4.0.35"

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "build-cuda.sh: needs python3 with pip" >&2; exit 1; }
command -v cc >/dev/null || { echo "build-cuda.sh: needs a C compiler (cc) for nvcc's host code" >&2; exit 1; }
log() { echo "[build-cuda] $*" >&2; }

# 1. Wheels (a wheel already in the cache is not asked for again).
mkdir -p "$WHEELS"
missing=()
while read -r pin; do
  name="${pin%%==*}"; version="${pin##*==}"
  file_prefix="$(echo "$name" | tr - _)-$version-"
  if ! compgen -G "$WHEELS/$file_prefix*.whl" >/dev/null; then missing+=("$pin"); fi
done <<<"$PINS"
if ((${#missing[@]})); then
  log "downloading ${#missing[@]} wheel(s) into $WHEELS"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    -d "$WHEELS" "${missing[@]}"
else
  log "wheels: cached in $WHEELS"
fi

# 2. The toolkit tree, rebuilt only when the pin list changes.
if [[ ! -f "$TREE/.pins" || "$(cat "$TREE/.pins")" != "$PINS" ]]; then
  log "unpacking into $TREE"
  rm -rf "$TREE" "$TREE.tmp"
  mkdir -p "$TREE.tmp"
  while read -r pin; do
    name="${pin%%==*}"; version="${pin##*==}"
    wheel=$(compgen -G "$WHEELS/$(echo "$name" | tr - _)-$version-*.whl" | head -n1)
    "$PY" -m zipfile -e "$wheel" "$TREE.tmp/unpacked"
  done <<<"$PINS"
  mv "$TREE.tmp/unpacked/nvidia/cu13" "$TREE"
  rm -rf "$TREE.tmp"
  # zipfile drops the executable bits.
  chmod +x "$TREE"/bin/* "$TREE"/nvvm/bin/*
  # Unversioned names for the linker (libcublas.so -> libcublas.so.13, ...).
  for lib in "$TREE"/lib/lib*.so.*; do
    base="${lib##*/}"; plain="${base%%.so.*}.so"
    [[ -e "$TREE/lib/$plain" ]] || ln -s "$base" "$TREE/lib/$plain"
  done
  echo "$PINS" >"$TREE/.pins"
else
  log "toolkit: cached in $TREE"
fi
"$TREE/bin/nvcc" --version | grep -q "release 13.0" || { echo "build-cuda.sh: $TREE/bin/nvcc is not CUDA 13.0" >&2; exit 1; }

# The driver stub: every cu* entry point cudarc declares, each returning
# CUDA_ERROR_STUB_LIBRARY (34). Only the linker sees it.
CUDARC_SRC=$(cd "$ROOT" && cargo metadata --format-version 1 --features cuda --manifest-path crates/cli/Cargo.toml 2>/dev/null |
  "$PY" -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
STUB="$TREE/lib/stubs/libcuda.so"
STUB_ID="$CUDARC_SRC stub-v2"
if [[ ! -f "$STUB" || ! -f "$TREE/lib/stubs/.from" || "$(cat "$TREE/lib/stubs/.from")" != "$STUB_ID" ]]; then
  log "compiling the libcuda.so stub from $CUDARC_SRC"
  mkdir -p "$TREE/lib/stubs"
  {
    # The error-text calls answer, so that a binary run against the stub reports "no driver".
    echo 'int cuGetErrorString(int e, const char **s) { *s = "no NVIDIA driver (stub libcuda)"; return 0; }'
    echo 'int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    grep -ohE '^\s*(pub )?fn (cu[A-Za-z0-9_]+)\(' "$CUDARC_SRC/src/driver/sys/mod.rs" |
      sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u | grep -vE '^cuGetError(String|Name)$' |
      awk '{print "int " $1 "(void) { return 34; }"}'
  } >"$TREE/lib/stubs/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$TREE/lib/stubs/cuda_stub.c"
  echo "$STUB_ID" >"$TREE/lib/stubs/.from"
fi

# 3. The build.
export CUDA_HOME="$TREE" CUDA_PATH="$TREE"
export PATH="$TREE/bin:$PATH"
export LIBRARY_PATH="$TREE/lib:$TREE/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_PROFILE_RELEASE_STRIP=symbols
cd "$ROOT"
start=$(date +%s)
log "cargo build --release --features cuda (compute capability $CUDA_COMPUTE_CAP) into $TARGET_DIR"
cargo build --release --features cuda -p camelid --target-dir "$TARGET_DIR"
BIN="$TARGET_DIR/release/camelid"

if ((WITH_TESTS)); then
  # The device-generic tests (CAMELID_TEST_DEVICE=cuda): parity with transformers and
  # llama.cpp on the committed fixtures (CAMELID_FIXTURES points them at a copy). Their build
  # graph (dev-dependencies) unifies a build-time dependency's features differently, so cargo
  # builds candle's kernels a second time for it (as long as the first, once).
  log "building the device-generic test binaries"
  cargo test --release --features cuda -p camelid-engine --target-dir "$TARGET_DIR" \
    --test parity --test llamacpp_families --test t5_parity --no-run --message-format=json 2>/dev/null |
    "$PY" -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' >"$TARGET_DIR/test-binaries.txt"
  [[ -s "$TARGET_DIR/test-binaries.txt" ]] || { echo "build-cuda.sh: no test binaries built" >&2; exit 1; }
  BUNDLE="$TARGET_DIR/bundle"
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/tests"
  strip -o "$BUNDLE/camelid" "$BIN"
  while read -r t; do
    strip -o "$BUNDLE/tests/$(basename "$t" | sed -E 's/-[0-9a-f]{16}$//')" "$t"
  done <"$TARGET_DIR/test-binaries.txt"
  tar -C "$BUNDLE" -cf - . | xz -6 -T0 >"$TARGET_DIR/bundle.tar.xz"
  log "bundle: $TARGET_DIR/bundle.tar.xz ($(stat -c %s "$TARGET_DIR/bundle.tar.xz") bytes): camelid, $(ls "$BUNDLE/tests" | tr '\n' ' ')"
fi

strip "$BIN"
size=$(stat -c %s "$BIN")
log "built in $(($(date +%s) - start)) s"
echo "$BIN $size bytes ($((size / 1024 / 1024)) MiB)"
ldd "$BIN" 2>/dev/null | grep -E 'cuda|cublas|curand|nvrtc' >&2 || true
# A GPU machine takes 64 MiB of carried files. The stripped binary is larger than that (candle's
# GGUF kernels for sm_90a are ~33 MB of it) but packs to ~9 MB with xz: carry the bundle.
if ((size >= MAX_BYTES)); then
  log "the binary is over 64 MiB uncompressed: carry it packed (--tests makes bundle.tar.xz; scripts/gpu/prepare.sh)"
fi
if ((WITH_TESTS)); then
  bundle_size=$(stat -c %s "$TARGET_DIR/bundle.tar.xz")
  if ((bundle_size >= MAX_BYTES)); then
    echo "build-cuda.sh: $TARGET_DIR/bundle.tar.xz is $bundle_size bytes, over 64 MiB" >&2
    exit 1
  fi
fi
