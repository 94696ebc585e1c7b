"""Graph rewrites for ONNX Runtime after tracing: fewer, fused nodes per layer.

RMSNorm: the traced `Transformer` normalises as
    x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), [-1]) + eps))
and the graph optimiser folds the norm's weight into the next MatMul, so onnxscript's
own RMS fusion (which wants the weight multiply) does not match. This rule turns the
rest into one `SimplifiedLayerNormalization` (ONNX Runtime's RMSNorm kernel, CPU and
CUDA) with a unit scale: six nodes become one, 2 * layers + 1 times per step.
"""

from __future__ import annotations

import numpy as np


def _rules():
    import onnx_ir as ir
    from onnxscript.rewriter import _ir_utils, pattern

    def rms(op, x, two, axes, eps):
        mean = op.ReduceMean(op.Pow(x, two), axes, keepdims=1, noop_with_empty_axes=0)
        return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean, eps))))

    def check(context, x, two, axes, eps, **_):
        axes_value = _ir_utils.get_numpy_value(axes)
        return (_ir_utils.get_singleton_value(two) == 2.0 and axes_value is not None
                and axes_value.reshape(-1).tolist() == [-1]
                and isinstance(_ir_utils.get_singleton_value(eps), float)
                and x.dtype == ir.DataType.FLOAT and x.shape is not None and isinstance(x.shape[-1], int))

    def fused(op, x, two, axes, eps, **_):
        scale = op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=np.float32)))
        return op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_ir_utils.get_singleton_value(eps),
                                               stash_type=1)

    return pattern.RewriteRuleSet([pattern.RewriteRule(rms, fused, check, name="RmsNormFoldedScale")],
                                  commute=True)


def fuse(proto):
    """ModelProto -> (ModelProto with the fusions applied, number of rewrites)."""
    import onnx_ir as ir
    from onnx_ir.passes import common

    model = ir.from_proto(proto)
    common.ShapeInferencePass()(model)
    count = _rules().apply_to_model(model)
    return ir.to_proto(model), count
