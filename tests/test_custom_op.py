"""TreeAttention custom op: parity with a numpy reference, in-place cache, build and locator.

The library is built once per session (cached under $STREAMSPEC_CACHE or
~/.cache/streamspec).  Parity tests run on the CPU execution provider, and also on the
CUDA execution provider when onnxruntime-gpu sees a GPU (or STREAMSPEC_TEST_CUDA=1,
which makes a missing GPU a failure instead of a skip).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from streamspec import custom_ops  # noqa: E402
from streamspec.custom_ops import CustomOpError  # noqa: E402
from streamspec.tools.bench_attention import op_model, random_parents  # noqa: E402


def _cuda_wanted() -> bool:
    if os.environ.get("STREAMSPEC_TEST_CUDA") == "1":
        return True
    return "CUDAExecutionProvider" in ort.get_available_providers()


PROVIDERS = ["cpu"] + (["cuda"] if _cuda_wanted() else [])


# --------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def cpu_library() -> Path:
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed, the TreeAttention library cannot be built")
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler (g++) is installed, the TreeAttention library cannot be built")
    return custom_ops.build()


@pytest.fixture(scope="session")
def cuda_library() -> Path:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.fail("STREAMSPEC_TEST_CUDA=1 but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    arch = os.environ.get("STREAMSPEC_TEST_CUDA_ARCH") or custom_ops.gpu_arch()
    return custom_ops.build(cuda=True, cuda_arch=[arch] if arch else None)


@pytest.fixture(scope="session")
def libraries(request, cpu_library):
    libs = {"cpu": cpu_library}
    if "cuda" in PROVIDERS:
        libs["cuda"] = request.getfixturevalue("cuda_library")
    return libs


# --------------------------------------------------------------------------------------
# Model and sessions


def make_model(num_heads, kv_num_heads, head_dim, num_streams, dtype=np.float32, scale=0.0):
    return op_model("custom", num_heads, kv_num_heads, head_dim, num_streams, dtype, scale)


def make_session(model, provider: str, lib: Path, threads: int = 2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    if provider == "cuda":
        # Fail instead of silently running the node on the CPU kernel.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers)


# --------------------------------------------------------------------------------------
# Reference


def random_tree(kind: str, n: int, rng) -> np.ndarray:
    if kind == "chain":
        parent = np.arange(-1, n - 1)
    elif kind == "star":
        parent = np.zeros(n, dtype=np.int64)
        parent[0] = -1
    else:
        parent = random_parents(rng, n)
    return parent.astype(np.int32)


def ancestors_or_self(parent: np.ndarray, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(parent[node])
    return path


def reference(feeds, num_heads, kv_num_heads, num_streams, scale=0.0):
    """Output and updated caches of TreeAttention, computed densely in float64."""
    q = feeds["query"][0].astype(np.float64)
    k = feeds["key"][0].astype(np.float64)
    v = feeds["value"][0].astype(np.float64)
    kc = feeds["key_cache"].copy()
    vc = feeds["value_cache"].copy()
    past = int(feeds["past_length"][0])
    parent = feeds["tree_parent"]
    compact = feeds["compact_src"]
    seq = q.shape[0]
    hd = q.shape[1] // num_heads
    n_nodes = len(parent)
    m = len(compact)
    for i in range(m):  # ascending, in place
        kc[0, :, past - m + i] = kc[0, :, compact[i]]
        vc[0, :, past - m + i] = vc[0, :, compact[i]]
    k_new = feeds["key"][0, :n_nodes].reshape(n_nodes, kv_num_heads, hd).transpose(1, 0, 2)
    v_new = feeds["value"][0, :n_nodes].reshape(n_nodes, kv_num_heads, hd).transpose(1, 0, 2)
    kc[0, :, past : past + n_nodes] = k_new
    vc[0, :, past : past + n_nodes] = v_new

    # allowed[r, c]: query row r may attend to new row c (the cache [0, past) always).
    allowed = np.zeros((seq, seq), dtype=bool)
    for r in range(seq):
        node = r if r < n_nodes else (r - n_nodes) // num_streams
        allowed[r, ancestors_or_self(parent, node)] = True
        if r >= n_nodes:
            j = (r - n_nodes) % num_streams + 1
            allowed[r, n_nodes + node * num_streams : n_nodes + node * num_streams + j] = True
    mask = np.concatenate([np.ones((seq, past), dtype=bool), allowed], axis=1)

    group = num_heads // kv_num_heads
    keys = np.concatenate([kc[0, :, :past].astype(np.float64), k.reshape(seq, kv_num_heads, hd).transpose(1, 0, 2)], 1)
    vals = np.concatenate([vc[0, :, :past].astype(np.float64), v.reshape(seq, kv_num_heads, hd).transpose(1, 0, 2)], 1)
    keys = np.repeat(keys, group, axis=0)  # [H, past + S, hd]
    vals = np.repeat(vals, group, axis=0)
    qh = q.reshape(seq, num_heads, hd).transpose(1, 0, 2)  # [H, S, hd]
    s = np.einsum("hsd,htd->hst", qh, keys) * (scale or 1.0 / np.sqrt(hd))
    s = np.where(mask[None], s, -np.inf)
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("hst,htd->hsd", p, vals).transpose(1, 0, 2).reshape(1, seq, num_heads * hd)
    return out, kc, vc


def make_feeds(rng, *, num_heads, kv_num_heads, head_dim, n_nodes, num_streams, past, max_len, m, tree, dtype):
    seq = n_nodes * (1 + num_streams)

    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    # Compaction sources: increasing rows at or after their targets, below past + N.
    compact = np.zeros(0, dtype=np.int32)
    if m:
        dst = np.arange(past - m, past)
        span = max_len - n_nodes - (past - m)
        offs = np.sort(rng.choice(span, size=m, replace=False))
        compact = np.maximum(dst, (past - m) + offs).astype(np.int32)
        compact = np.maximum.accumulate(compact).astype(np.int32)
    return {
        "query": rand(1, seq, num_heads * head_dim),
        "key": rand(1, seq, kv_num_heads * head_dim),
        "value": rand(1, seq, kv_num_heads * head_dim),
        "key_cache": rand(1, kv_num_heads, max_len, head_dim),
        "value_cache": rand(1, kv_num_heads, max_len, head_dim),
        "past_length": np.array([past], dtype=np.int64),
        "tree_parent": random_tree(tree, n_nodes, rng),
        "compact_src": compact,
    }


# (heads, kv heads, head_dim, nodes, tree, streams, past, compacted rows, max_len)
F32_CASES = [
    (4, 4, 16, 1, "chain", 0, 0, 0, 8),
    (4, 4, 16, 1, "chain", 3, 0, 0, 8),
    (4, 4, 32, 5, "random", 0, 7, 0, 32),
    (6, 2, 16, 8, "chain", 3, 33, 2, 64),
    (6, 2, 64, 16, "star", 3, 100, 5, 160),
    (8, 2, 32, 24, "random", 3, 65, 3, 128),
    (8, 2, 64, 1, "chain", 3, 2048, 4, 2056),
    (12, 4, 64, 64, "chain", 0, 300, 10, 400),
    (6, 2, 64, 64, "random", 3, 2048, 7, 2200),
    (4, 1, 48, 37, "star", 3, 17, 17, 64),
    (4, 2, 24, 11, "random", 3, 0, 0, 16),
    (2, 1, 8, 2, "chain", 3, 1000, 2, 1010),  # head_dim below one vector, cache split
    (9, 3, 64, 41, "random", 3, 1500, 5, 1700),  # 31 row blocks: uneven groups and last block
]
F16_CASES = [
    (4, 4, 16, 1, "chain", 3, 0, 0, 8),
    (6, 2, 64, 16, "random", 3, 129, 4, 160),
    (8, 2, 32, 32, "star", 0, 500, 3, 600),
    (9, 3, 64, 64, "random", 3, 1024, 6, 1100),
    (4, 2, 24, 1, "chain", 3, 1500, 1, 1501),  # split cache, leftover dims
]


def _case_id(case):
    h, kvh, hd, n, tree, g, past, m, _ = case
    return f"h{h}kv{kvh}d{hd}-{tree}{n}-g{g}-past{past}-m{m}"


def _to_device(value: np.ndarray, provider: str):
    device = "cuda" if provider == "cuda" else "cpu"
    return ort.OrtValue.ortvalue_from_numpy(value, device, 0)


def _check_case(case, dtype, provider, libraries, seed):
    h, kvh, hd, n, tree, gamma, past, m, max_len = case
    rng = np.random.default_rng(seed)
    feeds = make_feeds(
        rng, num_heads=h, kv_num_heads=kvh, head_dim=hd, n_nodes=n, num_streams=gamma,
        past=past, max_len=max_len, m=m, tree=tree, dtype=dtype,
    )
    originals = {k: v.copy() for k, v in feeds.items()}
    sess = make_session(make_model(h, kvh, hd, gamma, dtype), provider, libraries[provider])
    out, kc, vc = sess.run(None, feeds)
    ref_out, ref_kc, ref_vc = reference(feeds, h, kvh, gamma)

    for name, value in feeds.items():  # a plain run never writes into its inputs
        np.testing.assert_array_equal(value, originals[name], err_msg=f"input {name} was modified")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == np.float32 else dict(atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, **tol)
    np.testing.assert_array_equal(kc, ref_kc)
    np.testing.assert_array_equal(vc, ref_vc)

    # Only the compaction targets and rows [past, past + N) may change: stream rows are
    # never written.
    writable = np.zeros(max_len, dtype=bool)
    writable[past - m : past + n] = True
    for got, before in ((kc, feeds["key_cache"]), (vc, feeds["value_cache"])):
        changed = np.any(got != before, axis=(0, 1, 3))
        assert not np.any(changed & ~writable), f"rows {np.flatnonzero(changed & ~writable)} changed"


# --------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", F32_CASES, ids=_case_id)
def test_parity_float32(case, provider, libraries):
    _check_case(case, np.float32, provider, libraries, seed=zlib.crc32(_case_id(case).encode()))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", F16_CASES, ids=_case_id)
def test_parity_float16(case, provider, libraries):
    _check_case(case, np.float16, provider, libraries, seed=zlib.crc32(_case_id(case).encode()))


# The CPU library holds one attention kernel per instruction set (AVX-512, AVX2, 128-bit)
# and runs the best the CPU has; STREAMSPEC_CPU_KERNEL selects a lower one, so that every
# kernel this machine can run is checked, not only the best.
@pytest.mark.parametrize("kernel", ["avx2", "base"])
def test_parity_lower_cpu_kernels(kernel, libraries, monkeypatch):
    monkeypatch.setenv("STREAMSPEC_CPU_KERNEL", kernel)
    for case in (F32_CASES[5], F32_CASES[8], F32_CASES[11], F32_CASES[12]):
        _check_case(case, np.float32, "cpu", libraries, seed=zlib.crc32(_case_id(case).encode()))
    for case in (F16_CASES[3], F16_CASES[4]):
        _check_case(case, np.float16, "cpu", libraries, seed=zlib.crc32(_case_id(case).encode()))


def test_unknown_cpu_kernel_is_an_error(libraries, monkeypatch):
    monkeypatch.setenv("STREAMSPEC_CPU_KERNEL", "avx")  # a typo must not run another kernel silently
    case = F32_CASES[3]
    with pytest.raises(Exception, match="STREAMSPEC_CPU_KERNEL must be avx2, base or unset"):
        _check_case(case, np.float32, "cpu", libraries, seed=0)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_explicit_scale_and_single_thread(provider, libraries):
    rng = np.random.default_rng(7)
    feeds = make_feeds(rng, num_heads=4, kv_num_heads=2, head_dim=32, n_nodes=6, num_streams=3,
                       past=40, max_len=64, m=2, tree="random", dtype=np.float32)
    sess = make_session(make_model(4, 2, 32, 3, np.float32, scale=0.3), provider, libraries[provider], threads=1)
    out, _, _ = sess.run(None, feeds)
    ref_out, _, _ = reference(feeds, 4, 2, 3, scale=0.3)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_in_place_with_io_binding(provider, dtype, libraries):
    """One OrtValue bound as key_cache and key_cache_out is updated in place."""
    rng = np.random.default_rng(11)
    h, kvh, hd, n, gamma, past, m, max_len = 6, 2, 32, 9, 3, 50, 3, 80
    feeds = make_feeds(rng, num_heads=h, kv_num_heads=kvh, head_dim=hd, n_nodes=n, num_streams=gamma,
                       past=past, max_len=max_len, m=m, tree="random", dtype=dtype)
    ref_out, ref_kc, ref_vc = reference(feeds, h, kvh, gamma)
    sess = make_session(make_model(h, kvh, hd, gamma, dtype), provider, libraries[provider])

    # (On the CPU an OrtValue made from numpy shares its memory: hand it a copy.)
    kc = _to_device(feeds["key_cache"].copy(), provider)
    vc = _to_device(feeds["value_cache"].copy(), provider)
    kc_ptr, vc_ptr = kc.data_ptr(), vc.data_ptr()
    binding = sess.io_binding()
    for name in ("query", "key", "value", "past_length", "tree_parent", "compact_src"):
        binding.bind_ortvalue_input(name, _to_device(feeds[name], provider))
    binding.bind_ortvalue_input("key_cache", kc)
    binding.bind_ortvalue_input("value_cache", vc)
    # get_outputs() follows the binding order: bind in the graph's output order.
    binding.bind_output("output", "cuda" if provider == "cuda" else "cpu")
    binding.bind_ortvalue_output("key_cache_out", kc)
    binding.bind_ortvalue_output("value_cache_out", vc)
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()

    outs = binding.get_outputs()
    assert outs[1].data_ptr() == kc_ptr and outs[2].data_ptr() == vc_ptr
    assert kc.data_ptr() == kc_ptr
    np.testing.assert_array_equal(kc.numpy(), ref_kc)  # the bound buffer itself changed
    np.testing.assert_array_equal(vc.numpy(), ref_vc)
    assert not np.array_equal(kc.numpy(), feeds["key_cache"])
    tol = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(outs[0].numpy().astype(np.float64), ref_out, atol=tol, rtol=tol)

    # A second step on the same buffers: commit 2 of the 9 nodes, then a fresh tree.
    past2 = past + 2
    step2 = make_feeds(rng, num_heads=h, kv_num_heads=kvh, head_dim=hd, n_nodes=4, num_streams=gamma,
                       past=past2, max_len=max_len, m=0, tree="chain", dtype=dtype)
    step2["compact_src"] = np.array([past + 0, past + 4], dtype=np.int32)  # rows of nodes 0 and 4
    step2["key_cache"], step2["value_cache"] = ref_kc, ref_vc
    ref2_out, ref2_kc, _ = reference(step2, h, kvh, gamma)
    for name in ("query", "key", "value", "past_length", "tree_parent", "compact_src"):
        binding.bind_ortvalue_input(name, _to_device(step2[name], provider))
    binding.bind_output("output", "cuda" if provider == "cuda" else "cpu")  # new shape
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    np.testing.assert_array_equal(kc.numpy(), ref2_kc)
    np.testing.assert_allclose(binding.get_outputs()[0].numpy().astype(np.float64), ref2_out, atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------
# Errors, build facts, locator


def test_bad_values_raise_one_sentence(libraries):
    rng = np.random.default_rng(3)
    sess = make_session(make_model(4, 2, 16, 0), "cpu", libraries["cpu"])
    feeds = make_feeds(rng, num_heads=4, kv_num_heads=2, head_dim=16, n_nodes=4, num_streams=0,
                       past=10, max_len=16, m=0, tree="chain", dtype=np.float32)
    bad = dict(feeds, past_length=np.array([13], dtype=np.int64))  # 13 + 4 > 16
    with pytest.raises(Exception, match="past_length 13 must lie in"):
        sess.run(None, bad)
    bad = dict(feeds, tree_parent=np.array([-1, 0, 2, 1], dtype=np.int32))
    with pytest.raises(Exception, match=r"tree_parent\[2\] = 2"):
        sess.run(None, bad)
    bad = dict(feeds, compact_src=np.array([16], dtype=np.int32))
    with pytest.raises(Exception, match=r"compact_src\[0\] = 16 is outside"):
        sess.run(None, bad)
    sess = make_session(make_model(4, 2, 16, 3), "cpu", libraries["cpu"])  # S = 4 is not N * 4
    with pytest.raises(Exception, match="need 16"):
        sess.run(None, feeds)


def test_build_info_and_locator(cpu_library):
    assert custom_ops.library_path("cpu") == cpu_library
    assert custom_ops.library_path("CPUExecutionProvider") == cpu_library
    info = custom_ops.library_info(cpu_library)
    assert info["onnxruntime_version"] == ort.__version__
    assert info["min_ort_api"] == 17 and info["headers_api_version"] >= 17
    assert info["cuda"] is False
    lib = ctypes.CDLL(str(cpu_library))
    lib.StreamspecOpsBuildInfo.restype = ctypes.c_char_p
    built = json.loads(lib.StreamspecOpsBuildInfo().decode())
    assert built["min_ort_api"] == 17 and built["cuda"] is False
    # A second build is a no-op and returns the same path.
    assert custom_ops.build() == cpu_library

    so = ort.SessionOptions()
    assert custom_ops.register(so, "cpu") == cpu_library


def test_register_errors(tmp_path, monkeypatch, cpu_library):
    monkeypatch.setenv("STREAMSPEC_CACHE", str(tmp_path))
    with pytest.raises(CustomOpError, match=r"not built for onnxruntime \d+\.\d+: run `streamspec build-ops`"):
        custom_ops.register(ort.SessionOptions(), "cpu")
    assert custom_ops.library_path("cpu") is None
    # A build for another onnxruntime version is named in the message.
    other = tmp_path / "ops" / "ort-1.0-cpu"
    other.mkdir(parents=True)
    shutil.copy(cpu_library, other / cpu_library.name)
    with pytest.raises(CustomOpError, match=r"found builds for 1\.0\)"):
        custom_ops.register(ort.SessionOptions(), "cpu")
    # A library from other kernel sources is refused.
    key = "ort-%s-cpu" % ".".join(ort.__version__.split(".")[:2])
    mine = tmp_path / "ops" / key
    mine.mkdir(parents=True)
    shutil.copy(cpu_library, mine / cpu_library.name)
    (mine / "build-info.json").write_text(json.dumps({"sources_sha256": "0" * 64}))
    with pytest.raises(CustomOpError, match="other kernel sources"):
        custom_ops.register(ort.SessionOptions(), "cpu")
    with pytest.raises(CustomOpError, match="unknown provider"):
        custom_ops.register(ort.SessionOptions(), "tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(CustomOpError, match="install onnxruntime-gpu"):
            custom_ops.register(ort.SessionOptions(), "cuda")


def test_headers_from_npm_tarball(tmp_path, monkeypatch):
    """The header fetch keeps only the framework's headers (tarball faked, no network)."""
    import io
    import tarfile

    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        names = [custom_ops._HEADERS_IN_TARBALL + h for h in custom_ops._REQUIRED_HEADERS]
        names += ["package/README.md", custom_ops._HEADERS_IN_TARBALL + "sub/evil.h", "package/other/x.h"]
        for name in names:
            data = b"#define ORT_API_VERSION 29\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("STREAMSPEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setattr(custom_ops, "_fetch_tarball", lambda workdir: tgz)
    folder = custom_ops.ort_headers()
    assert folder == tmp_path / "cache" / "ort-headers-0.4.9"
    assert sorted(p.name for p in folder.iterdir()) == sorted(custom_ops._REQUIRED_HEADERS)
    assert custom_ops.headers_api_version(folder) == 29
    with pytest.raises(CustomOpError, match="lacks the ONNX Runtime headers"):
        custom_ops.ort_headers(tmp_path)


def test_arch_rules():
    assert custom_ops.normalise_archs(["sm_90", "87", "8.0", "87"]) == ["80", "87", "90"]
    assert custom_ops.normalise_archs("80,90") == ["80", "90"]
    with pytest.raises(CustomOpError):
        custom_ops.normalise_archs(["ampere"])
    runs = custom_ops.arch_runs_on
    assert runs(["80", "87", "90"], "86")  # sm_80 code runs on 8.6
    assert runs(["80", "87", "90"], "120")  # PTX of compute_90 is JIT-compiled
    assert not runs(["87", "90"], "75")
    assert not runs(["90"], "89")


# --------------------------------------------------------------------------------------
# CUDA compile check (no GPU needed)


@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc is not on PATH")
def test_cuda_library_compiles(tmp_path, monkeypatch, cpu_library):
    """Builds the CUDA library for sm_87 and sm_90; a compile or link error fails the test."""
    headers = custom_ops.ort_headers()  # fetched by the CPU build
    monkeypatch.setenv("STREAMSPEC_CACHE", str(tmp_path))
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(headers))
    try:
        lib = custom_ops.build(cuda=True, cuda_arch=["87", "90"])
    except CustomOpError as exc:
        pytest.fail(str(exc))
    assert lib.is_file() and lib.name == "libstreamspec_ops_cuda.so"
    info = custom_ops.library_info(lib)
    assert info["cuda"] is True and info["cuda_archs"] == ["87", "90"]
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert "RegisterCustomOps" in symbols
