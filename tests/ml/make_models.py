"""Make the small ONNX models the model tests use (tests/ml/data/*.onnx).

Run once after changing it (needs the ``onnx`` package, a development-only
dependency that comes with skl2onnx)::

    python tests/ml/make_models.py

Every model takes ``x``: float32 [N, 3] and gives ``score``: float32 [N, 1].

- ``sum``: score = x0 + x1 + x2
- ``sum_scaled``: score = 1.01 * (x0 + x1 + x2) (a candidate that nearly agrees)
- ``nan``: score = NaN (a model gone wrong)
- ``slow``: ``sum`` plus about 300 M multiply-adds of matrix products per call whose result
  it multiplies by zero (a model ten times or more slower than its budget)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATA = Path(__file__).parent / "data"


def _model(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (DATA / f"{name}.onnx").write_bytes(model.SerializeToString())


def main() -> None:
    DATA.mkdir(exist_ok=True)
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    summed = helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1)
    _model("sum", [helper.make_node("Identity", ["s"], ["score"]), summed][::-1], [axes])
    k = numpy_helper.from_array(np.array(1.01, dtype=np.float32), "k")
    _model("sum_scaled", [summed, helper.make_node("Mul", ["s", "k"], ["score"])], [axes, k])
    nan = numpy_helper.from_array(np.array(np.nan, dtype=np.float32), "nan")
    _model("nan", [summed, helper.make_node("Mul", ["s", "nan"], ["score"])], [axes, nan])
    # slow: a [N, 3] x [3, 1024] product, then twenty [N, 256] x [1024, 1024] ones
    # on a matrix made at run time (ConstantOfShape keeps the file small).
    shape = numpy_helper.from_array(np.array([1024, 1024], dtype=np.int64), "shape")
    wide = numpy_helper.from_array(np.array([3, 1024], dtype=np.int64), "wide")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    nodes = [
        summed,
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["w"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.001]),
        ),
        helper.make_node(
            "ConstantOfShape",
            ["wide"],
            ["w0"],
            value=helper.make_tensor("v0", TensorProto.FLOAT, [1], [0.01]),
        ),
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
    ]
    prev = "h0"
    for i in range(1, 300):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes += [
        helper.make_node("ReduceSum", [prev, "axes"], ["junk"], keepdims=1),
        helper.make_node("Mul", ["junk", "zero"], ["nothing"]),
        helper.make_node("Add", ["s", "nothing"], ["score"]),
    ]
    _model("slow", nodes, [axes, shape, wide, zero])


if __name__ == "__main__":
    main()
