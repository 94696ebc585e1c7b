#!/usr/bin/env bash
# GPU check of the TreeAttention custom op (custom_ops/).
#
# On a machine with an NVIDIA GPU, onnxruntime-gpu, the CUDA toolkit (nvcc), cmake and
# g++: builds the CUDA library for this GPU, runs tests/test_custom_op.py with the
# CUDAExecutionProvider enabled (parity with the numpy reference, in-place cache), and
# prints the per-op latency of TreeAttention next to onnxruntime's GroupQueryAttention
# with a dense additive tree bias (the `portable` backend's attention) for a few tree
# sizes.  Takes a few minutes; needs no network (the ORT headers are fetched once by
# the CPU build; set ORT_INCLUDE_DIR on an offline machine).
#
# Usage: tools/gpu_check.sh [--arch 90] [--python PATH] [--past 1024] [--no-tests] [--no-bench] [--cpu]
#   --arch      CUDA architecture to build for (default: the GPU's, from nvidia-smi)
#   --python    Python interpreter with onnxruntime-gpu, numpy, onnx, pytest (default: $PYTHON or python3)
#   --past      committed cache rows in the latency table (default 1024)
#   --no-tests  skip the parity tests;  --no-bench  skip the latency table
#   --cpu       check the script itself on a machine without a GPU: CPU library, CPU tests, CPU table
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
ARCH=""
PAST=1024
RUN_TESTS=1
RUN_BENCH=1
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
    --cpu) PROVIDER=cpu; shift ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

command -v "$PY" >/dev/null || die "no Python interpreter '$PY': pass --python"
command -v cmake >/dev/null || die "cmake is not installed"
"$PY" -c "import numpy, onnx, onnxruntime" 2>/dev/null || die "$PY lacks numpy, onnx or onnxruntime"
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
  echo "== per-op latency (median of interleaved runs, IO-bound in-place caches)"
  timeout 180 "$PY" - "$PROVIDER" "$PAST" <<'PYEOF'
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from streamspec import custom_ops

provider, past = sys.argv[1], int(sys.argv[2])
H, KVH, HD, GAMMA = 9, 3, 64, 3  # SmolLM2-135M's attention shape, 3 streams
max_len = past + 4 * 64 + 64
dtype = np.float16 if provider == "cuda" else np.float32
elem = TensorProto.FLOAT16 if provider == "cuda" else TensorProto.FLOAT
device = "cuda" if provider == "cuda" else "cpu"
providers = ["CUDAExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
reps = 200 if provider == "cuda" else 30


def vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def model(node, inputs, outputs):
    graph = helper.make_graph([node], "g", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("streamspec", 1),
              helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def session(graph, custom=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom:
        custom_ops.register(so, provider)
    return ort.InferenceSession(graph, so, providers=providers)


qkv = [vi("query", elem, [1, "S", H * HD]), vi("key", elem, [1, "S", KVH * HD]), vi("value", elem, [1, "S", KVH * HD])]
cache_in = [vi(n, elem, [1, KVH, max_len, HD]) for n in ("kc", "vc")]
outs = [vi("output", elem, None), vi("kc_out", elem, None), vi("vc_out", elem, None)]
tree_graph = model(
    helper.make_node("TreeAttention", ["query", "key", "value", "kc", "vc", "past_length", "tree_parent", "compact_src"],
                     ["output", "kc_out", "vc_out"], domain="streamspec", num_heads=H, kv_num_heads=KVH,
                     scale=0.0, num_streams=GAMMA),
    qkv + cache_in + [vi("past_length", TensorProto.INT64, [1]), vi("tree_parent", TensorProto.INT32, ["N"]),
                      vi("compact_src", TensorProto.INT32, ["M"])], outs)
gqa_graph = model(
    helper.make_node("GroupQueryAttention", ["query", "key", "value", "kc", "vc", "seqlens_k", "total_sequence_length",
                                             "", "", "", "attention_bias"],
                     ["output", "kc_out", "vc_out"], domain="com.microsoft", num_heads=H, kv_num_heads=KVH),
    qkv + cache_in + [vi("seqlens_k", TensorProto.INT32, [1]), vi("total_sequence_length", TensorProto.INT32, []),
                      vi("attention_bias", elem, [1, 1, "S", "T"])], outs)

tree_sess = session(tree_graph, custom=True)
try:
    gqa_sess = session(gqa_graph)
except Exception as exc:  # noqa: BLE001 - report and go on with TreeAttention alone
    gqa_sess = None
    print("GroupQueryAttention unavailable:", str(exc).splitlines()[0][:200])


keep = []  # bound OrtValues (and the numpy arrays behind CPU ones) must outlive the runs


def bind(sess, feeds, caches):
    b = sess.io_binding()
    b.bind_output("output", device)
    for name, arr in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(arr, device, 0)
        keep.append((arr, value))
        b.bind_ortvalue_input(name, value)
    for name, value in caches.items():
        keep.append(value)
        b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_output(name + "_out", value)
    return b


def tree_mask(parent, n, s):
    allowed = np.zeros((s, s), dtype=bool)
    for r in range(s):
        node = r if r < n else (r - n) // GAMMA
        cur = node
        while cur >= 0:
            allowed[r, cur] = True
            cur = parent[cur]
        if r >= n:
            j = (r - n) % GAMMA + 1
            allowed[r, n + node * GAMMA: n + node * GAMMA + j] = True
    return allowed


rng = np.random.default_rng(0)
print(f"provider={provider} dtype={np.dtype(dtype).name} heads={H}/{KVH} head_dim={HD} streams={GAMMA} past={past}")
print(f"{'nodes':>5} {'rows':>5} {'TreeAttention us':>17} {'GQA+bias us':>12} {'GQA/Tree':>9}")
for n in (1, 4, 16, 32, 64):
    s = n * (1 + GAMMA)
    parent = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], dtype=np.int32)
    q = rng.standard_normal((1, s, H * HD)).astype(dtype)
    k = rng.standard_normal((1, s, KVH * HD)).astype(dtype)
    v = rng.standard_normal((1, s, KVH * HD)).astype(dtype)

    def cache():
        return ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KVH, max_len, HD)).astype(dtype), device, 0)

    runs = [(tree_sess, bind(tree_sess, {"query": q, "key": k, "value": v,
                                         "past_length": np.array([past], np.int64), "tree_parent": parent,
                                         "compact_src": np.array([past - 1], np.int32)},
                             {"kc": cache(), "vc": cache()}))]
    if gqa_sess is not None:
        bias = np.concatenate([np.zeros((s, past)), np.where(tree_mask(parent, n, s), 0.0, -10000.0)], 1)
        runs.append((gqa_sess, bind(gqa_sess, {"query": q, "key": k, "value": v,
                                              "seqlens_k": np.array([past + s - 1], np.int32),
                                              "total_sequence_length": np.array(past + s, np.int32),
                                              "attention_bias": bias.astype(dtype)[None, None]},
                                    {"kc": cache(), "vc": cache()})))
    times = [[] for _ in runs]
    for _ in range(5):
        for sess, b in runs:
            sess.run_with_iobinding(b)
    for _ in range(reps):
        for i, (sess, b) in enumerate(runs):
            t0 = time.perf_counter()
            sess.run_with_iobinding(b)
            b.synchronize_outputs()
            times[i].append(time.perf_counter() - t0)
    med = [float(np.median(t)) * 1e6 for t in times]
    gqa = f"{med[1]:>12.1f} {med[1] / med[0]:>9.2f}" if len(med) > 1 else f"{'-':>12} {'-':>9}"
    print(f"{n:>5} {s:>5} {med[0]:>17.1f} {gqa}")
PYEOF
fi
echo "== done"
