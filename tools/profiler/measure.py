"""Measurements of the device itself: copy bandwidth, memory in use, what it is, and the
step-latency curve of a loaded engine. Nothing here imports torch.

Every measurement degrades to None plus a reason instead of failing: a profile taken on
a board without nvidia-smi or psutil still has everything else.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Any, Optional

import numpy as np

from streamspec.errors import first_line
from streamspec.tools.harness import peak_rss_bytes, rss_bytes, time_steps, timed

COPY_BYTES = 256 * 2 ** 20  # well above the last-level cache of any edge CPU
CURVE_NODES = (1, 2, 4, 8, 16, 32, 64)


# ------------------------------------------------------------------ bandwidth
def copy_bandwidth(device: str, nbytes: int = COPY_BYTES, repeats: int = 3) -> dict[str, Any]:
    """Best-of-`repeats` copy bandwidth of a buffer larger than the caches.

    Bytes moved count the read and the write (STREAM's convention), so the figure is
    the memory traffic one can sustain; reading weights is half of such a copy's work.
    """
    try:
        seconds = _cuda_copy_seconds(nbytes, repeats) if device == "cuda" else _host_copy_seconds(nbytes, repeats)
    except Exception as error:  # an unusual ORT build or no device memory: say so, keep going
        return dict(bytes_per_second=None, buffer_bytes=nbytes, method=f"not measured ({first_line(error, 160)})")
    method = ("onnxruntime.copy_tensors between two CUDA OrtValues" if device == "cuda"
              else "numpy copy between two host buffers")
    return dict(bytes_per_second=2 * nbytes / seconds, buffer_bytes=nbytes, method=method)


def _host_copy_seconds(nbytes: int, repeats: int) -> float:
    src = np.ones(nbytes // 4, dtype=np.float32)  # ones, not empty: pages must be touched
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # warm-up: page faults land here, not in the timing
    return min(timed(lambda: np.copyto(dst, src)) for _ in range(repeats))


def _cuda_copy_seconds(nbytes: int, repeats: int) -> float:
    import onnxruntime as ort

    if not hasattr(ort, "copy_tensors"):
        raise RuntimeError("this onnxruntime has no copy_tensors")
    src = ort.OrtValue.ortvalue_from_shape_and_type([nbytes // 4], np.float32, "cuda", 0)
    dst = ort.OrtValue.ortvalue_from_shape_and_type([nbytes // 4], np.float32, "cuda", 0)
    ort.copy_tensors([src], [dst])  # without a stream the copy is synchronous
    return min(timed(lambda: ort.copy_tensors([src], [dst])) for _ in range(repeats))


# ------------------------------------------------------------------ memory
def cuda_memory_used() -> tuple[Optional[int], str]:
    """(bytes of GPU memory this process holds, how it was read). nvidia-smi is absent on
    Jetson boards, whose memory is the host's: there RSS is the figure to read."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found (on Jetson the host RSS includes GPU memory)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"nvidia-smi failed ({first_line(error, 160)})"
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(os.getpid()) and fields[1].isdigit():
            return int(fields[1]) * 2 ** 20, "nvidia-smi (this process)"
    return None, "nvidia-smi lists no memory for this process"


class MemoryProbe:
    """Memory readings for the live view and the report, at most every `interval` seconds
    (nvidia-smi costs tens of ms): this process's RSS and its high-water mark (the
    harness's readers) and, on CUDA, the GPU memory this process holds."""

    def __init__(self, device: str, interval: float = 1.0):
        self.device, self.interval = device, interval
        self._last = -float("inf")
        self.reading: dict[str, Any] = {}

    def sample(self, force: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.reading = dict(host_rss_bytes=rss_bytes(), host_peak_rss_bytes=peak_rss_bytes(),
                                device_used_bytes=None, device_method=None)
            if self.device == "cuda":
                self.reading["device_used_bytes"], self.reading["device_method"] = cuda_memory_used()
        return self.reading


# ------------------------------------------------------------------ the system
def system_info(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    return dict(platform=platform.platform(), machine=platform.machine(), cpu=_cpu_name(),
                cpu_count=os.cpu_count(), python=platform.python_version(), onnxruntime=ort.__version__,
                available_providers=ort.get_available_providers(), device=device,
                device_name=_gpu_name() if device == "cuda" else _cpu_name())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _gpu_name() -> str:
    for path in ("/proc/device-tree/model",):  # Jetson boards name themselves here
        try:
            with open(path, encoding="utf-8", errors="replace") as model:
                return model.read().strip("\x00\n ")
        except OSError:
            pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
            if out.strip():
                return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "CUDA device"


def weight_bytes(config) -> int:
    """Bytes of the exported graph files: the weights, up to the few kB of the graph."""
    names = filter(None, (config.graph["file"], config.graph.get("external_data")))
    return sum((config.folder / name).stat().st_size for name in names)


# ------------------------------------------------------------------ step latency
def balanced_tree(nodes: int, vocab_size: int):
    """A balanced binary tree (node i under node (i - 1) // 2): cost follows rows, this
    shape keeps positions in range for any size, and its first k nodes are a subtree."""
    from streamspec.runtime.tree import Tree

    parents = np.array([-1] + [(i - 1) // 2 for i in range(1, nodes)], dtype=np.int32)
    depths = np.zeros(nodes, dtype=np.int32)
    for i in range(1, nodes):
        depths[i] = depths[parents[i]] + 1
    return Tree(np.arange(nodes, dtype=np.int64) % vocab_size, parents, depths, np.ones(nodes, dtype=np.float32))


def latency_curve(engine, past: int, sizes=CURVE_NODES, repeats: int = 3, extra=()) -> list[dict[str, Any]]:
    """Median and best latency of one step on trees of `sizes` (+ `extra`) nodes that fit
    after `past` cached rows, plus the autoregressive step (one node, no streams).

    Trees are balanced binary (`balanced_tree`).
    """
    rows_per_node = 1 + engine.config.num_streams
    fits = sorted({n for n in (*sizes, *extra) if n >= 1 and past + n * rows_per_node <= engine.max_length})
    points = []
    shapes = [(1, False)] + [(n, engine.can_speculate) for n in fits if engine.can_speculate or n > 1]
    for nodes, drafting in shapes:
        tree = balanced_tree(nodes, engine.config.vocab_size)
        # One warm-up step first (time_steps' default): shapes change, ORT may allocate.
        times = time_steps({"step": lambda: engine.forward(tree, past, drafting)}, repeats)["step"]
        points.append(dict(nodes=nodes, rows=nodes * (rows_per_node if drafting else 1), drafting=drafting,
                           median_ms=1000 * statistics.median(times), min_ms=1000 * min(times), repeats=repeats))
    return points

