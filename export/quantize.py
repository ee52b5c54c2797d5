"""Weight quantization of a bundle's graphs, with ONNX Runtime's own quantizers (activations stay fp32).

    int8: dynamic int8 (quantize_dynamic): int8 weights, activations quantized per call (MatMulInteger); its
          embedding tables too (a uint8 Gather and a DequantizeLinear)
    int4: weight-only int4 (MatMulNBitsQuantizer -> MatMulNBits), blocks of INT4_BLOCK along the input axis,
          symmetric, accuracy level INT4_ACCURACY (int8 activations inside the kernel on the CPU)

int4 quantizes every weight matrix: each MatMul with a constant weight, and each Gemm (the fusion head's and the
MLM decoder's Linear) once written as a MatMul and an Add. Its embedding tables stay fp32: ONNX Runtime's quantized
gather (GatherBlockQuantized) has given silently wrong rows on CUDA (onnxruntime#31692, #32663), and a gather
reads one row a token, so its table costs memory but no time (docs/benchmarks.md, "4-bit weights").
"""

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights import bundle_weights, save

INT4_BLOCK = 32  # weights per scale, as llama.cpp's q4_0; 128 is up to 22% faster and doubles the quality cost
# (docs/benchmarks.md, "4-bit weights")
INT4_ACCURACY = 4  # MatMulNBits' accuracy_level: int8 activations in the CPU kernel (the fastest measured)
QUANTIZATIONS = {"int8": "int8-dynamic", "int4": "int4-weight-only"}  # --quantize -> the manifest's quantization


def settings(quantize: str | None) -> dict:
    """What the manifest's source records of a quantization."""
    if quantize == "int4":
        return {"block_size": INT4_BLOCK, "symmetric": True, "accuracy_level": INT4_ACCURACY, "embeddings": "fp32"}
    if quantize == "int8":
        return {"weights": "int8, symmetric, per tensor", "activations": "dynamic uint8", "embeddings": "int8"}
    return {}


def quantize(path: Path, how: str) -> None:
    """Quantizes the graph at path in place ("int8" or "int4"), after the offline optimization (which folds the
    transposes some exporters put between a weight and its MatMul, so that each weight is a constant the
    quantizers see); a large graph's weights stay in <name>.weights."""
    weights = bundle_weights(path)
    large = weights.exists()
    model = (to_int8 if how == "int8" else to_int4)(path, large)
    weights.unlink(missing_ok=True)
    save(model, path, weights if large else None)


def to_int8(path: Path, large: bool) -> onnx.ModelProto:
    """Dynamic int8 quantization of the weights (for CPU edge devices); activations stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        quantized = Path(work) / path.name
        logging.disable(logging.WARNING)  # the quantizer logs advice on every graph through the root logger
        try:
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, use_external_data_format=large)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(quantized))


def to_int4(path: Path, large: bool) -> onnx.ModelProto:
    """Weight-only int4 of every weight matrix (MatMulNBits); embedding tables left as they are."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    gemms_as_matmuls(model)
    logging.disable(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            block_size=INT4_BLOCK,
            is_symmetric=True,
            accuracy_level=INT4_ACCURACY,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    return quantizer.model.model


def gemms_as_matmuls(model: onnx.ModelProto) -> None:
    """Rewrites each Gemm with a constant weight (alpha 1, beta 1, A not transposed) as MatMul (+ Add of its bias),
    the weight stored [in, out], so the int4 quantizer, which takes MatMuls, quantizes it."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = constants.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            weight is None
            or attributes.get("alpha", 1.0) != 1.0
            or attributes.get("beta", 1.0) != 1.0
            or attributes.get("transA", 0)
        ):
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weight)
        matrix = np.ascontiguousarray(matrix.T) if attributes.get("transB", 0) else matrix
        name = f"{weight.name}.in_out"
        graph.initializer.append(numpy_helper.from_array(matrix, name))
        product = node.output[0] if len(node.input) < 3 else f"{node.output[0]}.product"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if len(node.input) >= 3:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
    used = {name for node in nodes for name in node.input} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
