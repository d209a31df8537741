"""ONNX operators the TensorRT ONNX parser supports (onnx-tensorrt's support matrix, read
for TensorRT 8.4 to 10; opset <= 17). Ops newer than 8.5 map to the first version with them."""
from __future__ import annotations

SUPPORTED = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
    MaxPool Mean Min Mul Neg Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where Xor
    LayerNormalization
    """.split()
)

# Supported, but only from this TensorRT version on (JetPack 5.1 ships 8.5).
MIN_TENSORRT = {"LayerNormalization": "8.6"}


def unsupported(ops) -> list[str]:
    return sorted(set(ops) - SUPPORTED)


def min_tensorrt(ops) -> str:
    versions = [MIN_TENSORRT[op] for op in ops if op in MIN_TENSORRT]
    return max(versions, key=lambda v: tuple(int(x) for x in v.split(".")), default="8.5")


# The TensorRT a deployment runs (deedsr-export --trt): the opset whose operators it parses and the
# graph precisions its build mode reads (engines/modes.py). JetPack 5.1 ships 8.5, JetPack 6.0 8.6,
# JetPack 6.1/6.2 10.3.
TARGETS = {
    "8.5": {"opset": 16, "precisions": ("fp32",),
            "why": "opset 16 spells LayerNormalization with basic operators (8.5 cannot parse it); FP16 builder "
                   "flag on the fp32 graphs"},
    "8.6": {"opset": 17, "precisions": ("fp32",), "why": "FP16 builder flag on the fp32 graphs"},
    "10": {"opset": 17, "precisions": ("fp32", "fp16"), "why": "strongly typed fp16 graphs (fp32 for checks)"},
    "11": {"opset": 17, "precisions": ("fp32", "fp16"),
           "why": "strongly typed fp16 graphs; 11 has no FP16 builder flag (fp32 for checks)"},
}


def target_settings(trt: str, opset: int | None, precisions: tuple[str, ...] | None) -> tuple[int, tuple[str, ...]]:
    """(opset, precisions) for `--trt` (explicit --opset/--precision must agree with it)."""
    want = TARGETS[trt]
    if opset is not None and opset > want["opset"]:
        raise ValueError(f"--trt {trt} needs --opset {want['opset']} or lower ({want['why']}), got --opset {opset}")
    if precisions is not None and not set(want["precisions"]) - {"fp32"} <= set(precisions):
        raise ValueError(f"--trt {trt} builds from the {','.join(want['precisions'])} graphs; "
                         f"leave --precision out or include them")
    if precisions is not None and "fp32" in want["precisions"] and trt.startswith("8") and "fp32" not in precisions:
        raise ValueError(f"--trt {trt} builds fp16 plans from the fp32 graphs; include fp32 in --precision")
    return (opset if opset is not None else want["opset"]), (precisions or want["precisions"])
