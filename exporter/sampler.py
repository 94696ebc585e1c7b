"""ONNX translation of `streamspec::sample_tokens`: exact sampling inside the graph.

Per row, with z = logits / T over the whole vocabulary:

  1. sorted head: TopK(z, K) with K = top_k if top_k > 0, else V if top_p < 1, else 1
     (the sort covers exactly what the filters need, so greedy and plain temperature
     sampling sort nothing);
  2. thresholds: top-k keeps z >= the K-th largest value; top-p keeps the smallest
     prefix of the sorted (top-k filtered) list whose probability reaches top_p;
  3. inverse CDF in vocabulary order: w = exp(z - max) on the kept tokens, c = cumsum(w),
     the token is the first id with c > u * c[-1].

Step 3 needs no sorting because an inverse CDF draws from the same distribution in any
order. Tokens tied with the threshold value are all kept. The draw is exact up to
float32 rounding of the cumulative sum; the host supplies u in [0, 1).
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op

_INT64 = onnx.TensorProto.INT64


def sample_tokens(logits, temperature, top_k, top_p, uniform):
    zero_i, one_i = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    one_f = op.Constant(value_floats=[1.0])
    neg_inf = op.Constant(value_float=float("-inf"))
    z = op.Div(logits, temperature)  # [O, V]
    vocab = op.Shape(z, start=1, end=2)  # [1]
    use_top_k = op.Greater(top_k, zero_i)
    use_top_p = op.Less(top_p, one_f)
    sort_k = op.Where(use_top_k, op.Min(top_k, vocab), op.Where(use_top_p, vocab, one_i))
    head, _ = op.TopK(z, sort_k, axis=-1, largest=1, sorted=1)  # [O, K] descending
    z_max = op.Slice(head, zero_i, one_i, one_i)  # [O, 1]
    # top-k threshold: the K-th largest value.
    kth = op.Gather(head, op.Sub(sort_k, one_i), axis=1)  # [O, 1]
    threshold_k = op.Where(use_top_k, kth, neg_inf)
    # top-p threshold: keep sorted entries whose preceding mass is below top_p. With
    # top-p on, the sorted head holds the whole top-k-filtered set, so its sum is the
    # normaliser.
    head_weight = op.Exp(op.Sub(head, z_max))
    mass_before = op.Div(op.CumSum(head_weight, one_i, exclusive=1),
                         op.ReduceSum(head_weight, one_i, keepdims=1))
    kept = op.ReduceSum(op.Cast(op.Less(mass_before, top_p), to=_INT64), one_i, keepdims=1)  # [O, 1] >= 1
    last_kept = op.GatherElements(head, op.Sub(kept, one_i), axis=1)  # [O, 1]
    threshold_p = op.Where(use_top_p, last_kept, neg_inf)
    threshold = op.Max(threshold_k, threshold_p)
    # Inverse CDF over the kept tokens, in vocabulary order.
    weight = op.Where(op.GreaterOrEqual(z, threshold), op.Exp(op.Sub(z, z_max)),
                      op.CastLike(op.Constant(value_float=0.0), z))
    cdf = op.CumSum(weight, one_i)  # [O, V]
    total = op.Gather(cdf, op.Sub(vocab, one_i), axis=1)  # [O, 1]
    target = op.Mul(op.Unsqueeze(uniform, one_i), total)
    token = op.ReduceSum(op.Cast(op.LessOrEqual(cdf, target), to=_INT64), one_i, keepdims=0)  # [O]
    # Rounding guard: u * total can only reach total for u within 2^-24 of 1; fall back
    # to the most probable token, which is always kept.
    best = op.ArgMax(z, axis=1, keepdims=0)
    return op.Where(op.Less(token, vocab), token, best)
