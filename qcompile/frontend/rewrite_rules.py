"""The one place that imports onnxscript's rewrite rules (some live in private modules).

Rules used by the frontend: BatchNormalization folded into a preceding Conv / ConvTranspose / Gemm
(exact: ``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is a Conv with weights scaled per
output channel by ``gamma / sqrt(var + eps)`` and a shifted bias); a constant zero Pad folded into the Conv that
reads it (exporters of TF-style "same" padding write one before each strided Conv; left alone, it sits between
the Conv and its input's quantization); and inference-mode Dropout removed.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.rewriter
from onnxscript.rewriter.rules.common import (
    dropout_inference_rule,
    dropout_zero_rule,
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
    fuse_pad_into_conv_rule,
)

NORMALIZATION_RULES = [
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
    fuse_pad_into_conv_rule,
    dropout_inference_rule,
    dropout_zero_rule,
]


def apply_normalization_rules(model: ir.Model) -> None:
    """Apply :data:`NORMALIZATION_RULES` to ``model`` in place."""
    onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=NORMALIZATION_RULES)
