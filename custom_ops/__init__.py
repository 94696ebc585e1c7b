"""The ``TreeAttention`` custom op for ONNX Runtime: build, locate and register its library.

The kernels (C++ for the CPU execution provider, CUDA for the CUDA one) live next to
this file; :func:`build` compiles them with CMake into a cache folder, :func:`library_path`
finds a build for the installed onnxruntime and :func:`register` adds it to a
``SessionOptions``.  The op is ``streamspec.TreeAttention`` version 1; its contract is
documented in ``tree_attention.h``.

This module imports nothing else of streamspec, and onnxruntime only when needed, so the
edge runtime can use it with numpy + onnxruntime alone.

Cache layout (root: ``$STREAMSPEC_CACHE`` or ``~/.cache/streamspec``)::

    ort-headers-0.4.9/                 ORT C/C++ API headers (API 29), fetched from npm
    ops/ort-1.32-cpu/                  libstreamspec_ops.so + build-info.json
    ops/ort-1.32-cuda-sm80-87-90/      libstreamspec_ops_cuda.so + build-info.json
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

__all__ = [
    "CustomOpError",
    "DOMAIN",
    "OP_TYPE",
    "OP_VERSION",
    "MIN_ORT_VERSION",
    "DEFAULT_CUDA_ARCHS",
    "build",
    "library_path",
    "library_info",
    "register",
    "cache_dir",
    "ort_headers",
]

DOMAIN = "streamspec"
OP_TYPE = "TreeAttention"
OP_VERSION = 1

# The library calls nothing newer than ORT API 17 (KernelContext_ParallelFor), and the
# kernels return their errors through KernelComputeV2 (ORT >= 1.16); see register_ops.cc.
MIN_ORT_API = 17
MIN_ORT_VERSION = (1, 17)

DEFAULT_CUDA_ARCHS = ("80", "87", "90")

HEADERS_PACKAGE = "com.github.asus4.onnxruntime"
HEADERS_VERSION = "0.4.9"
_HEADERS_IN_TARBALL = (
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers/"
)
_REQUIRED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h")
_SOURCES = (
    "CMakeLists.txt",
    "register_ops.cc",
    "tree_attention.h",
    "tree_attention_cpu.cc",
    "tree_attention_cuda.h",
    "tree_attention_cuda.cu",
)
_INFO_FILE = "build-info.json"
_SOURCE_DIR = Path(__file__).resolve().parent


class CustomOpError(Exception):
    """A custom-op library problem, told in one sentence (missing, stale, wrong ORT or GPU)."""


# --------------------------------------------------------------------------------------
# Paths and versions


def cache_dir() -> Path:
    """Root of streamspec's cache: ``$STREAMSPEC_CACHE`` or ``~/.cache/streamspec``."""
    env = os.environ.get("STREAMSPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamspec"


def _ort_version() -> str:
    try:
        import onnxruntime
    except ImportError as exc:
        raise CustomOpError("onnxruntime is not installed: install onnxruntime or onnxruntime-gpu first") from exc
    return onnxruntime.__version__


def _major_minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise CustomOpError(f"cannot read the onnxruntime version {version!r}")
    return int(m.group(1)), int(m.group(2))


def _ort_key(version: str) -> str:
    major, minor = _major_minor(version)
    return f"{major}.{minor}"


def _library_name(cuda: bool) -> str:
    stem = "streamspec_ops_cuda" if cuda else "streamspec_ops"
    if sys.platform == "win32":
        return f"{stem}.dll"
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    return f"lib{stem}.so"


def normalise_archs(cuda_arch) -> list[str]:
    if cuda_arch is None:
        return list(DEFAULT_CUDA_ARCHS)
    if isinstance(cuda_arch, str):
        cuda_arch = [cuda_arch]
    archs: list[str] = []
    for item in cuda_arch:
        for part in re.split(r"[,;\s]+", str(item).strip()):
            if not part:
                continue
            digits = re.sub(r"^(sm_|compute_|sm|compute)", "", part.lower()).replace(".", "")
            if not re.fullmatch(r"\d{2,3}[af]?", digits):
                raise CustomOpError(f"bad CUDA architecture {part!r}: use numbers like 87 or sm_90")
            if digits not in archs:
                archs.append(digits)
    if not archs:
        raise CustomOpError("no CUDA architecture given: use numbers like 87 or sm_90")
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a).group()), a))


def _build_key(ort_key: str, cuda: bool, archs: list[str]) -> str:
    if not cuda:
        return f"ort-{ort_key}-cpu"
    return f"ort-{ort_key}-cuda-sm" + "-".join(archs)


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode())
        h.update((_SOURCE_DIR / name).read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(lock_file: Path):
    """Exclusive lock between processes (builds and header fetches into one cache)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# ORT headers


def _headers_ok(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_HEADERS)


def headers_api_version(folder: Path) -> int:
    text = (folder / "onnxruntime_c_api.h").read_text(errors="replace")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not m:
        raise CustomOpError(f"{folder / 'onnxruntime_c_api.h'} has no ORT_API_VERSION")
    return int(m.group(1))


def _fetch_tarball(workdir: Path) -> Path:
    spec = f"{HEADERS_PACKAGE}@{HEADERS_VERSION}"
    npm = shutil.which("npm")
    if npm:
        print(f"Fetching ONNX Runtime headers: npm pack {spec} (about 150 MB, once)")
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True, check=False
        )
        tgz = sorted(workdir.glob("*.tgz"))
        if proc.returncode == 0 and tgz:
            return tgz[0]
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]
        print(f"npm pack failed ({last}), trying the registry directly")
    url = f"https://registry.npmjs.org/{HEADERS_PACKAGE}/-/{HEADERS_PACKAGE}-{HEADERS_VERSION}.tgz"
    print(f"Fetching ONNX Runtime headers: {url} (about 150 MB, once)")
    target = workdir / f"{HEADERS_PACKAGE}-{HEADERS_VERSION}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(target, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except OSError as exc:
        raise CustomOpError(
            f"could not download the ONNX Runtime headers ({exc}): set ORT_INCLUDE_DIR to a folder with "
            "onnxruntime_lite_custom_op.h"
        ) from exc
    return target


def ort_headers(ort_include_dir: str | os.PathLike | None = None) -> Path:
    """Folder of ONNX Runtime C/C++ API headers to compile against.

    ``ort_include_dir`` or the ``ORT_INCLUDE_DIR`` environment variable when given;
    otherwise the headers of npm package ``com.github.asus4.onnxruntime`` 0.4.9
    (ORT API 29), fetched once into ``<cache>/ort-headers-0.4.9``.
    """
    explicit = ort_include_dir or os.environ.get("ORT_INCLUDE_DIR")
    if explicit:
        folder = Path(explicit).expanduser().resolve()
        if not _headers_ok(folder):
            raise CustomOpError(f"{folder} lacks the ONNX Runtime headers {', '.join(_REQUIRED_HEADERS)}")
        return folder
    folder = cache_dir() / f"ort-headers-{HEADERS_VERSION}"
    if _headers_ok(folder):
        return folder
    with _locked(cache_dir() / ".headers.lock"):
        if not _headers_ok(folder):  # another process may have fetched them meanwhile
            _fetch_headers(folder)
    return folder


def _fetch_headers(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".headers-") as tmp:
        tmpdir = Path(tmp)
        tgz = _fetch_tarball(tmpdir)
        staging = tmpdir / "headers"
        staging.mkdir()
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                for member in tar:
                    if not (member.isfile() and member.name.startswith(_HEADERS_IN_TARBALL)):
                        continue
                    name = member.name[len(_HEADERS_IN_TARBALL):]
                    if "/" in name or not name.endswith(".h"):
                        continue
                    src = tar.extractfile(member)
                    if src is not None:
                        (staging / name).write_bytes(src.read())
        except (tarfile.TarError, OSError) as exc:
            raise CustomOpError(f"could not unpack the ONNX Runtime headers from {tgz.name}: {exc}") from exc
        if not _headers_ok(staging):
            raise CustomOpError(f"{HEADERS_PACKAGE} {HEADERS_VERSION} did not contain the expected ONNX Runtime headers")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)


# --------------------------------------------------------------------------------------
# Build


def _run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln.strip() for ln in lines if re.search(r"error|Error|ERROR", ln)]
        hint = (errors[0] if errors else (lines[-1].strip() if lines else ""))[:300]
        raise CustomOpError(f"{what} failed ({hint}); full log: {log}")


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if cand and Path(cand).is_file():
            return cand
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cmake_archs(archs: list[str]) -> str:
    # Machine code for every arch, plus PTX of the newest so that newer GPUs can JIT it.
    parts = [f"{a}-real" for a in archs[:-1]] + [archs[-1]]
    return ";".join(parts)


def build(
    cuda: bool = False,
    cuda_arch: list[str] | None = None,
    ort_include_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Build the TreeAttention library for the installed onnxruntime and return its path.

    ``cuda=False`` builds ``libstreamspec_ops`` (CPU kernels); ``cuda=True`` builds
    ``libstreamspec_ops_cuda`` (CPU and CUDA kernels) for ``cuda_arch`` (default
    80, 87, 90; forms like ``"87"``, ``"sm_87"`` or ``"8.7"``).  The result is cached per
    onnxruntime version, CUDA-ness and architectures; it is rebuilt only when the kernel
    sources change or ``force`` is set.  Raises :class:`CustomOpError` with one sentence
    when a tool is missing or the build fails (the full log is kept next to the build).
    """
    ort_version = _ort_version()
    archs = normalise_archs(cuda_arch) if cuda else []
    out_dir = cache_dir() / "ops" / _build_key(_ort_key(ort_version), cuda, archs)
    with _locked(out_dir.parent / f".{out_dir.name}.lock"):
        return _build_locked(ort_version, cuda, archs, ort_include_dir, force, out_dir)


def _build_locked(ort_version: str, cuda: bool, archs: list[str], ort_include_dir, force: bool, out_dir: Path) -> Path:
    ort_key = _ort_key(ort_version)
    lib = out_dir / _library_name(cuda)
    info_path = out_dir / _INFO_FILE
    digest = _sources_digest()
    if not force and lib.is_file() and info_path.is_file():
        try:
            if json.loads(info_path.read_text()).get("sources_sha256") == digest:
                print(f"TreeAttention library up to date: {lib}")
                return lib
        except (OSError, ValueError):
            pass

    cmake = shutil.which("cmake")
    if not cmake:
        raise CustomOpError("cmake not found: install cmake (apt-get install cmake, or pip install cmake)")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise CustomOpError("no C++ compiler found: install g++ (apt-get install g++) or set CXX")
    nvcc = None
    if cuda:
        nvcc = _find_nvcc()
        if not nvcc:
            raise CustomOpError("nvcc not found: install the CUDA toolkit or set CUDACXX to the nvcc path")
    headers = ort_headers(ort_include_dir)
    api = headers_api_version(headers)
    if api < MIN_ORT_API:
        raise CustomOpError(f"the headers in {headers} are ORT API {api}, older than the API {MIN_ORT_API} the op needs")

    build_dir = out_dir / "build"
    if force and build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "build.log"
    log.write_text("")
    what = f"CUDA (sm_{', sm_'.join(archs)})" if cuda else "CPU"
    print(f"Building the TreeAttention {what} library for onnxruntime {ort_version} in {out_dir}")
    configure = [
        cmake,
        "-S", str(_SOURCE_DIR),
        "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CXX_COMPILER={cxx}",
        f"-DORT_INCLUDE_DIR={headers}",
        f"-DSTREAMSPEC_CUDA={'ON' if cuda else 'OFF'}",
    ]
    if cuda:
        configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={_cmake_archs(archs)}"]
    _run_logged(configure, log, "cmake configure")
    jobs = os.environ.get("STREAMSPEC_BUILD_JOBS", "2")
    _run_logged([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs], log, "compiling the kernels")

    built = [p for p in build_dir.rglob(_library_name(cuda)) if p.is_file()]
    if not built:
        raise CustomOpError(f"the build produced no {_library_name(cuda)}; full log: {log}")
    tmp = lib.with_name(lib.name + ".tmp")
    shutil.copy2(built[0], tmp)
    os.replace(tmp, lib)
    info = {
        "op": f"{DOMAIN}.{OP_TYPE}",
        "op_version": OP_VERSION,
        "library": lib.name,
        "onnxruntime_version": ort_version,
        "ort_key": ort_key,
        "headers_api_version": api,
        "min_ort_api": MIN_ORT_API,
        "min_onnxruntime": "%d.%d" % MIN_ORT_VERSION,
        "cuda": cuda,
        "cuda_archs": archs,
        "nvcc_version": _nvcc_version(nvcc) if nvcc else None,
        "machine": platform.machine(),
        "sources_sha256": digest,
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"Built {lib}")
    return lib


# --------------------------------------------------------------------------------------
# Locate and register


def _provider_is_cuda(provider: str) -> bool:
    p = provider.lower().replace("executionprovider", "")
    if p in ("cpu", ""):
        return False
    if p in ("cuda", "gpu"):
        return True
    raise CustomOpError(f"unknown provider {provider!r}: the TreeAttention op has kernels for 'cpu' and 'cuda'")


def library_info(path: str | os.PathLike) -> dict:
    """The ``build-info.json`` recorded next to a built library ({} when absent)."""
    info = Path(path).with_name(_INFO_FILE)
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}


def gpu_arch(device: int = 0) -> str | None:
    """Compute capability of a GPU as '87', via the CUDA driver; None when unknown."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return None
            dev = ctypes.c_int()
            major, minor = ctypes.c_int(), ctypes.c_int()
            if lib.cuDeviceGet(ctypes.byref(dev), device) != 0:
                return None
            # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
            if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0:
                return None
            if lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0:
                return None
            return f"{major.value}{minor.value}"
        except AttributeError:
            return None
    return None


def arch_runs_on(archs: list[str], gpu: str) -> bool:
    """Whether a build for ``archs`` (PTX for the last one) runs on compute capability ``gpu``."""
    def split(a: str) -> tuple[int, int]:
        n = int(re.match(r"\d+", a).group())
        return n // 10, n % 10

    g = split(gpu)
    for a in archs:
        maj, mnr = split(a)
        if a.endswith(("a", "f")):
            if (maj, mnr) == g:
                return True
        elif maj == g[0] and mnr <= g[1]:
            return True  # machine code runs on later minors of the same major
    return bool(archs) and split(archs[-1]) <= g and not archs[-1].endswith(("a", "f"))


def library_path(provider: str = "cpu") -> Path | None:
    """Path of a built library for the installed onnxruntime and ``provider``, else None.

    For ``"cuda"`` and several builds, the one whose architectures cover GPU 0 is
    preferred, then the most recent.
    """
    cuda = _provider_is_cuda(provider)
    ort_key = _ort_key(_ort_version())
    ops = cache_dir() / "ops"
    name = _library_name(cuda)
    if not cuda:
        lib = ops / _build_key(ort_key, False, []) / name
        return lib if lib.is_file() else None
    found = sorted(
        (p / name for p in ops.glob(f"ort-{ort_key}-cuda-*") if (p / name).is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not found:
        return None
    gpu = gpu_arch()
    if gpu:
        for lib in found:
            if arch_runs_on(library_info(lib).get("cuda_archs") or [], gpu):
                return lib
    return found[0]


def _other_builds(cuda: bool) -> list[str]:
    ops = cache_dir() / "ops"
    kind = "cuda" if cuda else "cpu"
    keys = set()
    for p in ops.glob(f"ort-*-{kind}*"):
        if (p / _library_name(cuda)).is_file():
            keys.add(p.name.split("-")[1])
    return sorted(keys)


def register(session_options, provider: str = "cpu") -> Path:
    """Register the TreeAttention library for ``provider`` ("cpu" or "cuda") on ``session_options``.

    Returns the library path.  Raises :class:`CustomOpError` with one sentence when the
    library is missing, stale, built for another onnxruntime, or not built for this GPU.
    """
    cuda = _provider_is_cuda(provider)
    ort_version = _ort_version()
    ort_key = _ort_key(ort_version)
    command = "streamspec build-ops --cuda" if cuda else "streamspec build-ops"
    if _major_minor(ort_version) < MIN_ORT_VERSION:
        raise CustomOpError(
            f"onnxruntime {ort_version} is older than {'%d.%d' % MIN_ORT_VERSION}, the oldest the TreeAttention op "
            "supports: upgrade onnxruntime"
        )
    if cuda:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise CustomOpError(
                f"onnxruntime {ort_version} has no CUDAExecutionProvider: install onnxruntime-gpu to use the CUDA kernel"
            )
    lib = library_path(provider)
    if lib is None:
        others = _other_builds(cuda)
        found = f" (found builds for {', '.join(others)})" if others else ""
        raise CustomOpError(f"custom-op library not built for onnxruntime {ort_key}{found}: run `{command}`")
    info = library_info(lib)
    if info.get("sources_sha256") != _sources_digest():
        raise CustomOpError(f"custom-op library {lib} was built from other kernel sources: run `{command}`")
    if info.get("machine") not in (None, platform.machine()):
        raise CustomOpError(f"custom-op library {lib} was built for {info.get('machine')}: run `{command}`")
    if cuda:
        archs = info.get("cuda_archs") or []
        gpu = gpu_arch()
        if gpu and archs and not arch_runs_on(archs, gpu):
            raise CustomOpError(
                f"custom-op library built for sm_{', sm_'.join(archs)} but this GPU is sm_{gpu}: "
                f"run `streamspec build-ops --cuda --cuda-arch {gpu}`"
            )
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CustomOpError(f"onnxruntime {ort_version} could not load {lib.name}: {first}") from exc
    return lib
