"""A GGUF file's own quantized blocks, carried into ONNX Runtime's block-quantized ops.

The default base model is a Q4_1 GGUF: its weights *are* 4-bit blocks. Re-quantizing
their de-quantized values onto a new 4-bit grid loses what the file had exactly (an
integer zero point cannot hit a Q4_1 block's offset m/d; about 8% relative error per
MatMul, docs/design.md). Instead each GGUF block becomes a block of
`com.microsoft.MatMulNBits` (and the embedding's of `GatherBlockQuantized`):

    GGUF                          per block (32 weights along K)     MatMulNBits / Gather
    Q4_0  w = d·(q − 8)           4-bit codes q                      scale d, zero point 8
    Q4_1  w = d·q + m             4-bit codes q                      scale d, zero point −m/d (float)
    Q8_0  w = d·q, q int8         8-bit codes q + 128                scale d, zero point 128
    Q4_K  w = d·sc·q − dmin·mn    4-bit codes, per 32-weight block    scale d·sc, zero point dmin·mn/(d·sc)
    Q6_K  w = d·sc·(q − 32)       8-bit codes, blocks of 16          scale d·sc, zero point 32

so that (code − zero point) · scale is the GGUF's own weight, exactly for Q4_0, Q8_0
and Q6_K and up to float rounding of the zero point for Q4_1 and Q4_K. Other types
are not carried and their MatMuls are quantized as for any float model: F16, Q2_K,
Q3_K, IQ*, and Q5_0 / Q5_1 / Q5_K, whose 5-bit codes would need 8-bit MatMulNBits with
float zero points, which ONNX Runtime's CPU kernel refuses (8-bit takes uint8 zero
points only).

A step graph does not name which GGUF tensor a MatMul weight came from (and the GGUF
conversion reorders the rows of Llama's q and k projections), so weights are matched by
content: every carried tensor is de-quantized here, its rows put in the Hugging Face
order, and a MatMul whose fp32 weight [K, N] has exactly those bytes (transposed) takes
its blocks. A weight that the streams' training changed, or an fp16 graph, matches
nothing and is left to the ordinary quantizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from streamspec.errors import StreamspecError

QK_K = 256  # weights per K-quant super-block


@dataclass
class Blocks:
    """One weight [N, K] as codes, scales and zero points per block along K:
    w[n, k] = (codes[n, k] − zero_points[n, k // block]) · scales[n, k // block]."""

    codes: np.ndarray  # [N, K] uint8, < 2**bits
    scales: np.ndarray  # [N, K // block_size] float32
    zero_points: np.ndarray  # [N, K // block_size] float32
    bits: int
    block_size: int
    gguf_type: str

    def dequantize(self) -> np.ndarray:
        """[N, K] float32 as ONNX Runtime computes it."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, -1, self.block_size).astype(np.float32)
        return ((codes - self.zero_points[:, :, None]) * self.scales[:, :, None]).reshape(n, k)

    def integer_zero_points(self, zero_points: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """MatMulNBits' uint8 zero_points (4 bits: two per byte, low nibble first, each
        row padded to whole bytes), or None when a zero point is not an integer code
        (Q4_1, Q4_K: w = d·q + m)."""
        zero = self.zero_points if zero_points is None else zero_points
        codes = np.rint(zero)
        if not np.array_equal(codes, zero) or codes.min() < 0 or codes.max() >= 1 << self.bits:
            return None
        codes = codes.astype(np.uint8)
        if self.bits == 8:
            return np.ascontiguousarray(codes.reshape(-1))
        if codes.shape[1] % 2:
            codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(-1)

    def offsets(self, zero_point: float = 0.0) -> np.ndarray:
        """[N, k_blocks] float32: each block's offset o in w = (q − zero_point)·d + o, i.e.
        (zero_point − its own zero point)·d; with zero_point 0, the m of w = d·q + m."""
        return ((zero_point - self.zero_points) * self.scales).astype(np.float32)

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: [N, k_blocks, block_size * bits / 8] uint8, codes low bits first."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, k // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(codes)
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


# ------------------------------------------------------------------------------ GGUF block layouts
def _halves(raw: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    return raw[:, :split], raw[:, split:]


def _f16(raw: np.ndarray) -> np.ndarray:
    """[B, 2] uint8 -> [B, 1] float32."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Codes of `group` weights stored as group/2 bytes: the low nibbles hold the first
    half of the group, the high nibbles the second (ggml's layout). [B, n·group/2] -> [B, n·group]."""
    b = qs.shape[0]
    qs = qs.reshape(b, -1, 1, group // 2)
    return ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(b, -1)


def _offset_zero(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray, block: int):
    """Blocks of w = scale·q + offset as (codes, scale, zero point = −offset/scale). A block
    whose scale is 0 is constant: code 1, scale = offset, zero point 0."""
    flat = scale == 0
    safe = np.where(flat, 1.0, scale)
    zero = np.where(flat, 0.0, -offset / safe).astype(np.float32)
    codes = codes.copy()
    codes.reshape(codes.shape[0], -1, block)[flat] = 1
    return codes, np.where(flat, offset, scale).astype(np.float32), zero


def _q4_0(raw: np.ndarray):
    d, qs = _halves(raw, 2)
    codes = _nibbles(qs, 32)
    return codes, _f16(d), np.full((len(raw), 1), 8.0, np.float32), 4, 32


def _q4_1(raw: np.ndarray):
    d, rest = _halves(raw, 2)
    m, qs = _halves(rest, 2)
    codes, scale, zero = _offset_zero(_f16(d), _f16(m), _nibbles(qs, 32), 32)
    return codes, scale, zero, 4, 32


def _q8_0(raw: np.ndarray):
    d, qs = _halves(raw, 2)
    codes = (np.ascontiguousarray(qs).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, _f16(d), np.full((len(raw), 1), 128.0, np.float32), 8, 32


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K super-block (12 bytes) -> [B, 8] each."""
    scales = scales.reshape(-1, 3, 4)
    d, m, high = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = np.concatenate([d & 0x3F, (high & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (high >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(raw: np.ndarray):
    d, rest = _halves(raw, 2)
    dmin, rest = _halves(rest, 2)
    scales, qs = _halves(rest, 12)
    sc, mn = _k_scale_min(scales)
    scale, offset = _f16(d) * sc, -(_f16(dmin) * mn)  # [B, 8] each: one per 32 weights
    codes, scale, zero = _offset_zero(scale, offset, _nibbles(qs, 64), 32)
    return codes, scale, zero, 4, 32


def _q6_k(raw: np.ndarray):
    b = len(raw)
    ql, rest = _halves(raw, QK_K // 2)
    qh, rest = _halves(rest, QK_K // 4)
    scales, d = _halves(rest, QK_K // 16)
    low = (ql.reshape(b, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(b, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = low.reshape(b, -1) | (high.reshape(b, -1) << 4)
    scale = _f16(d) * np.ascontiguousarray(scales).view(np.int8).astype(np.float32)  # [B, 16]
    return codes.astype(np.uint8), scale, np.full(scale.shape, 32.0, np.float32), 8, 16


LAYOUTS: dict[str, tuple[int, Callable]] = {  # type -> (weights per GGUF block, decoder)
    "Q4_0": (32, _q4_0), "Q4_1": (32, _q4_1), "Q8_0": (32, _q8_0),
    "Q4_K": (QK_K, _q4_k), "Q6_K": (QK_K, _q6_k),
}


def blocks_of(gguf_type: str, data: np.ndarray, rows: int, columns: int) -> Blocks:
    """The Blocks of a GGUF tensor of `rows` × `columns` (ggml: ne1 × ne0, blocks along
    the columns) from its raw bytes [rows, bytes per row]."""
    per_block, decode = LAYOUTS[gguf_type]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * (columns // per_block), -1)
    codes, scales, zero, bits, block = decode(raw)
    zero = np.broadcast_to(zero, scales.shape)
    return Blocks(codes.reshape(rows, columns).astype(np.uint8), scales.reshape(rows, -1).astype(np.float32),
                  np.ascontiguousarray(zero).reshape(rows, -1).astype(np.float32), bits, block, gguf_type)


def llama_row_order(rows: int, heads: int) -> np.ndarray:
    """Row i of the Hugging Face q/k projection is row order[i] of the GGUF tensor.

    llama.cpp stores the two rotary halves of each head interleaved; the GGUF reader of
    transformers puts them back as [head, 2, dim/2] -> [head, dim/2, 2] swapped."""
    dim = rows // heads // 2
    return np.arange(rows).reshape(heads, dim, 2).swapaxes(1, 2).reshape(rows)


def weight_key(weight_kn: np.ndarray) -> str:
    """The matching key of an fp32 MatMul weight [K, N]: sha256 of its bytes."""
    return hashlib.sha256(np.ascontiguousarray(weight_kn, dtype=np.float32).tobytes()).hexdigest()


def read_gguf_blocks(path: Path, num_heads: int, num_kv_heads: int,
                     family: str = "llama") -> tuple[dict[str, Blocks], dict[str, int]]:
    """({matching key: Blocks} of every carried 2-D tensor of a GGUF file, {GGUF type:
    tensors left out}); see `carried_weights`."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # a truncated or foreign file
        raise StreamspecError(f"{path} could not be read as a GGUF file ({error}).") from None
    tensors = [(t.name, t.tensor_type.name, t.data, int(t.shape[1]), int(t.shape[0]))  # ggml: ne1 rows, ne0 columns
               for t in reader.tensors if len(t.shape) == 2]
    return carried_weights(tensors, num_heads, num_kv_heads, family)


def carried_weights(tensors, num_heads: int, num_kv_heads: int,
                    family: str = "llama") -> tuple[dict[str, Blocks], dict[str, int]]:
    """tensors: (GGUF name, type, raw bytes, rows, columns) of 2-D tensors ->
    ({matching key: Blocks}, {type: tensors left out}).

    The key is that of the weight as a MatMul [K, N] in a graph traced from the Hugging
    Face model (rows of q and k back in the Hugging Face order); the embedding's Blocks
    are keyed by its [V, D] table as well, for the Gather."""
    carried: dict[str, Blocks] = {}
    skipped: dict[str, int] = {}
    for name, kind, data, rows, columns in tensors:
        if kind not in LAYOUTS:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        blocks = blocks_of(kind, data, rows, columns)
        weight = _gguf_dequantized(kind, data, rows, columns)
        if family == "llama" and (".attn_q." in name or ".attn_k." in name):
            order = llama_row_order(rows, num_heads if ".attn_q." in name else num_kv_heads)
            blocks = Blocks(blocks.codes[order], blocks.scales[order], blocks.zero_points[order],
                            blocks.bits, blocks.block_size, kind)
            weight = weight[order]
        carried[weight_key(weight.T)] = blocks
        if name.startswith("token_embd"):
            carried[weight_key(weight)] = blocks  # the Gather's table [V, D]
    return carried, skipped


def _gguf_dequantized(kind: str, data: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The fp32 weight [rows, columns] exactly as the GGUF conversion computed it
    (gguf-py's de-quantization, which transformers uses)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(np.asarray(data), GGMLQuantizationType[kind]).reshape(rows, columns).astype(np.float32)


def gguf_source(base_dir: Optional[Path]) -> Optional[Path]:
    """The GGUF file a converted base folder came from (None for a Hugging Face base)."""
    import json

    from streamspec.models.loading import SOURCE_FILE

    if base_dir is None or not (Path(base_dir) / SOURCE_FILE).is_file():
        return None
    try:
        path = Path(json.loads((Path(base_dir) / SOURCE_FILE).read_text(encoding="utf-8"))["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_file() else None
