"""torch module -> checked ONNX file, and fp32 -> fp16 for strongly typed TensorRT.

A graph whose weights pass the protobuf limit (the sd21-base UNet: 3.5 GB) never exists in
memory as a whole: the tracer writes its weights to files, onnx_ir maps them while the graph is
simplified and streams them into one `<name>.data` file, and the fp16 graph is converted from
the structure alone, its weights cast one tensor at a time.
"""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from deedsr.runtime.integrity import sha256_files

from .graphs import GraphSpec

PROTOBUF_LIMIT = 2**31 - 1
# onnxconverter_common's defaults, spelled out: the streamed fp16 conversion casts the same way.
FP16_MIN_POSITIVE, FP16_MAX_FINITE = 1e-7, 1e4
# Kept in fp32 inside fp16 graphs: normalisation statistics, softmax, the timestep embedding.
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos", "Exp", "Pow", "Sqrt",
            "ReduceMean", "Erf"]
DTYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def is_large(model) -> bool:
    """Does this graph (onnx_ir model) keep its weights in an external data file?"""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) \
        > PROTOBUF_LIMIT - 2**26


def save(model, path: Path) -> Path | None:
    """Save an onnx_ir model; a graph over the protobuf limit keeps its weights in one
    `<name>.data` file beside it (written tensor by tensor)."""
    import onnx_ir as ir

    if is_large(model):
        data = path.with_name(path.name + ".data")
        ir.save(model, path, external_data=data.name, size_threshold_bytes=1024)
        return data
    ir.save(model, path)
    return None


def structure(path: Path) -> onnx.ModelProto:
    """The graph without its external weights (the operators, names and types)."""
    return onnx.load(str(path), load_external_data=False)


def simplify(model) -> None:
    """onnxscript's optimizer passes without its pattern rewriter (whose matching grows
    superlinearly with graph size: 73 s for the tiny fused denoiser, for no fusion TensorRT
    or ONNX Runtime would not do itself), in place on an onnx_ir model: fold constants (with
    shape inference, which also gives the fp16 converter the value types it relies on), drop
    Identity chains and unused nodes, lift constants to initializers."""
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True)
    ir.passes.Sequential(
        passes.IdentityEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.OutputFixPass(),
        passes.NameFixPass(),
    )(model)


def export_graph(spec: GraphSpec, scratch: Path, example: tuple, opset: int):
    """Trace with the TorchScript exporter (dynamic axes by name) into `scratch`, then load it
    with onnx_ir (external weights stay on disk, memory-mapped, until saved) and simplify. The
    result reads from `scratch`: save it before removing that folder."""
    import onnx_ir as ir

    raw = scratch / f"{spec.name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(), example, str(raw), dynamo=False, opset_version=opset,
            input_names=[n for n, _ in spec.inputs], output_names=[n for n, _ in spec.outputs],
            dynamic_axes=spec.dynamic_axes(), do_constant_folding=True,
        )
    model = ir.load(raw)
    simplify(model)
    return model


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
            copy, keep_io_types=True, disable_shape_infer=True, min_positive_val=FP16_MIN_POSITIVE,
            max_finite_val=FP16_MAX_FINITE, op_block_list=sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)),
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


def fp16_file(src: Path, dst: Path) -> Path | None:
    """The fp16 graph of the fp32 graph at `src`, written to `dst`; returns its data file, if any.

    A graph with external weights is converted from its structure (the converter only flips
    the type of an external tensor), then each weight is read, cast like the converter casts
    (clamped to its finite range) and appended to `<dst>.data`: one tensor in memory at a time."""
    from onnxconverter_common.float16 import convert_np_to_float16

    proto = structure(src)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        onnx.load_external_data_for_model(proto, str(src.parent))
        onnx.save_model(to_fp16(proto, in_place=True), str(dst))
        return None
    source_types = {t.name: t.data_type for t in external}
    converted = to_fp16(proto, in_place=True)
    data = dst.with_name(dst.name + ".data")
    with open(data, "wb") as out:
        for tensor in converted.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            with open(src.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                raw = f.read(int(info["length"]))
            if source_types.get(tensor.name) == onnx.TensorProto.FLOAT and tensor.data_type == onnx.TensorProto.FLOAT16:
                raw = convert_np_to_float16(np.frombuffer(raw, np.float32), FP16_MIN_POSITIVE, FP16_MAX_FINITE).tobytes()
            out.seek(-out.tell() % 4096, 1)  # page-aligned, as onnx's own writer does for large tensors
            offset = out.tell()
            out.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
    onnx.save_model(converted, str(dst))
    return data


def check(path: Path) -> None:
    """Full onnx.checker pass and strict shape inference (both read the graph file; external
    weights are checked to exist and fit, not loaded)."""
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
