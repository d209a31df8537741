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
