"""The benchmarks' FLOP count: 2 per multiply-add by a non-zero Conv weight, from the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.bench.common import conv_flops


def two_conv_model(second: np.ndarray) -> onnx.ModelProto:
    """x [N,3,H,W] -> 3x3 conv to 4 channels (dense) -> ``second`` (a [Co,4,kH,kW] weight)."""
    first = np.ones((4, 3, 3, 3), np.float32)
    pad = second.shape[2] // 2
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "w2"], ["y"], pads=[pad] * 4),
        ],
        "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_counts_two_flops_per_multiply_add_at_the_inferred_output_shape() -> None:
    model = two_conv_model(np.full((2, 4, 1, 1), 0.5, np.float32))
    pixels = 2 * 10 * 12
    assert conv_flops(model, (2, 3, 10, 12)) == 2 * pixels * (4 * 3 * 9 + 2 * 4)


def test_zero_weights_are_not_counted() -> None:
    second = np.full((2, 4, 3, 3), 0.5, np.float32)
    second[:, :, 0, :] = 0  # a third of the taps are structural zeros
    pixels = 1 * 8 * 8
    assert conv_flops(two_conv_model(second), (1, 3, 8, 8)) == 2 * pixels * (4 * 3 * 9 + 2 * 4 * 6)


def test_input_rank_must_match() -> None:
    with pytest.raises(ValueError, match=r"model input has rank 4; got shape \[3, 8, 8\]"):
        conv_flops(two_conv_model(np.ones((2, 4, 1, 1), np.float32)), (3, 8, 8))
