"""The greedy choice as a graph of its own (runtime/graphs/greedy.onnx): a head's logits in, each row's best id and
its log-probabilities out, so that on a GPU the logits stay in device memory and only the chosen ids cross to the
host (runtime/onnx_backend.py). It holds no weights and fits every bundle; `python -m maria_onnx.export.greedy`
writes it, and tests/test_greedy.py checks the shipped file is what this module builds.

    logits [rows, V] fp32, refused [rows, K] int64 (ids a row may not take; a row repeats one to fill K)
    -> ids [rows] int64: the best id a row may take (the first of equals, as numpy's argmax)
       logprobs [rows] fp32: its log-probability under softmax(logits), as runtime/choose.py's token_logprobs
       allowed_logprobs [rows] fp32: the same over the ids the row may take
"""

import math
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8
GREEDY_FILE = Path(__file__).resolve().parent.parent / "runtime" / "graphs" / "greedy.onnx"


def _log_softmax_at(prefix: str, values: str, out: str) -> list[onnx.NodeProto]:
    """Nodes giving `out` [rows]: values[r, id_r] less the row's log-sum-exp, the row's largest value taken out
    before the exponentials (names of the nodes' outputs begin with prefix)."""
    return [
        helper.make_node("ReduceMax", [values], [f"{prefix}_max"], axes=[1], keepdims=1),
        helper.make_node("Sub", [values, f"{prefix}_max"], [f"{prefix}_shifted"]),
        helper.make_node("Exp", [f"{prefix}_shifted"], [f"{prefix}_exp"]),
        helper.make_node("ReduceSum", [f"{prefix}_exp", "axis"], [f"{prefix}_sum"], keepdims=1),
        helper.make_node("Log", [f"{prefix}_sum"], [f"{prefix}_log"]),
        helper.make_node("GatherElements", [f"{prefix}_shifted", "ids_column"], [f"{prefix}_picked"], axis=1),
        helper.make_node("Sub", [f"{prefix}_picked", f"{prefix}_log"], [f"{prefix}_at"]),
        helper.make_node("Squeeze", [f"{prefix}_at", "axis"], [out]),
    ]


def greedy_graph() -> onnx.ModelProto:
    """The graph the module's docstring describes."""
    minus_inf = helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [-math.inf])
    nodes = [
        helper.make_node("Shape", ["refused"], ["refused_shape"]),
        helper.make_node("ConstantOfShape", ["refused_shape"], ["refused_scores"], value=minus_inf),
        helper.make_node("ScatterElements", ["logits", "refused", "refused_scores"], ["scores"], axis=1),
        helper.make_node("ArgMax", ["scores"], ["ids"], axis=1, keepdims=0, select_last_index=0),
        helper.make_node("Unsqueeze", ["ids", "axis"], ["ids_column"]),
        *_log_softmax_at("full", "logits", "logprobs"),
        *_log_softmax_at("allowed", "scores", "allowed_logprobs"),
    ]
    graph = helper.make_graph(
        nodes,
        "greedy",
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", "vocab"]),
            helper.make_tensor_value_info("refused", TensorProto.INT64, ["rows", "refused"]),
        ],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows"]),
            helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["rows"]),
            helper.make_tensor_value_info("allowed_logprobs", TensorProto.FLOAT, ["rows"]),
        ],
        initializer=[helper.make_tensor("axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="maria-onnx", ir_version=IR_VERSION
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    GREEDY_FILE.parent.mkdir(exist_ok=True)
    GREEDY_FILE.write_bytes(greedy_graph().SerializeToString())
    print(GREEDY_FILE, file=sys.stderr)


if __name__ == "__main__":
    main()
