"""torch module -> checked ONNX file, and fp32 -> fp16 for strongly typed TensorRT."""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from deedsr.runtime.integrity import sha256_files
from onnx.external_data_helper import load_external_data_for_model

from .graphs import GraphSpec

PROTOBUF_LIMIT = 2**31 - 1
# Kept in fp32 inside fp16 graphs: normalisation statistics, softmax, the timestep embedding.
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos", "Exp", "Pow", "Sqrt",
            "ReduceMean", "Erf"]
DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def save(model: onnx.ModelProto, path: Path) -> Path | None:
    """Save; a graph over the protobuf limit keeps its weights in one `<name>.data` file beside it."""
    data = path.with_name(path.name + ".data")
    large = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT - 2**26
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        # saving moved the weights out of the proto; bring them back for the caller
        load_external_data_for_model(model, str(path.parent))
        return data
    onnx.save_model(model, str(path))
    return None


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer passes without its pattern rewriter (whose matching grows
    superlinearly with graph size: 73 s for the tiny fused denoiser, for no fusion TensorRT
    or ONNX Runtime would not do itself): fold constants (with shape inference, which also
    gives the fp16 converter the value types it relies on), drop Identity chains and unused
    nodes, lift constants to initializers."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    graph = ir.from_proto(model)
    fold_constants(graph, onnx_shape_inference=True)
    ir.passes.Sequential(
        passes.IdentityEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.OutputFixPass(),
        passes.NameFixPass(),
    )(graph)
    return ir.to_proto(graph)


def export_graph(spec: GraphSpec, path: Path, example: tuple, opset: int) -> onnx.ModelProto:
    """Trace with the TorchScript exporter (dynamic axes by name), then simplify."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                spec.module.eval(), example, str(raw), dynamo=False, opset_version=opset,
                input_names=[n for n, _ in spec.inputs], output_names=[n for n, _ in spec.outputs],
                dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
            )
        model = onnx.load(str(raw))
    return simplify(model)


def to_fp16(model: onnx.ModelProto, in_place: bool = False) -> onnx.ModelProto:
    """fp16 weights and activations, fp32 islands for FP32_OPS, fp32 graph inputs and outputs."""
    from onnxconverter_common import float16

    if in_place:
        copy = model  # the converter edits its argument
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            copy, keep_io_types=True, disable_shape_infer=True,
            op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
        )
    _restore_fp32_outputs(converted)
    return converted


def _restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """keep_io_types misses a graph output that other nodes also consume: cast it back."""
    for output in model.graph.output:
        tensor_type = output.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        half = output.name + "_fp16"
        for node in model.graph.node:
            node.input[:] = [half if i == output.name else i for i in node.input]
            node.output[:] = [half if o == output.name else o for o in node.output]
        model.graph.node.append(onnx.helper.make_node("Cast", [half], [output.name], to=onnx.TensorProto.FLOAT))
        tensor_type.elem_type = onnx.TensorProto.FLOAT


def check(path: Path) -> None:
    """Full onnx.checker pass (external data included) and strict shape inference."""
    onnx.checker.check_model(str(path), full_check=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(scratch) / "inferred.onnx"), strict_mode=True)


def operators(model: onnx.ModelProto) -> list[str]:
    return sorted({node.op_type for node in model.graph.node})


def io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    return {
        v.name: DTYPE_NAMES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
        for v in list(model.graph.input) + list(model.graph.output)
    }


def sha256_file(*paths: Path) -> str:
    """One digest over the files in order: what the runtime checks (deedsr.runtime.integrity)."""
    return sha256_files(paths)


def weights_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
