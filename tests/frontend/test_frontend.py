"""Frontend: loading checks, opset normalization, shape inference, constant lifting, BN folding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import pytest
from conftest import parse_model, save_model

from qcompile import execution, frontend
from qcompile.errors import CalibrationError, UnsafeModelError, UnsupportedModelError

CONV_BN = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y)
  <float[4, 3, 3, 3] w = {weights}, float[4] b = {bias}, float[4] s = {{1.5, 0.5, 2.0, 1.0}},
   float[4] t = {{0.1, -0.2, 0.3, 0.0}}, float[4] m = {{0.05, 0.1, -0.1, 0.2}}, float[4] v = {{1.0, 2.0, 0.5, 1.5}}> {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization (c, s, t, m, v)
    i = Identity (n)
    y = Relu (i)
}}
"""


def conv_bn_model(opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = ", ".join(f"{value:.4f}" for value in rng.standard_normal(4 * 3 * 3 * 3))
    bias = ", ".join(f"{value:.4f}" for value in rng.standard_normal(4))
    return parse_model(CONV_BN.format(opset=opset, weights="{" + weights + "}", bias="{" + bias + "}"))


@pytest.mark.parametrize("opset", [11, 13, 18, 23])
def test_opsets_normalize_to_canonical_and_fold_batchnorm(tmp_path: Path, opset: int) -> None:
    proto = conv_bn_model(opset)
    path = save_model(proto, tmp_path / "conv_bn.onnx")
    model = frontend.load(path)
    ops = [node.op_type for node in model.graph]
    assert model.opset_imports[""] == frontend.CANONICAL_OPSET
    assert ops == ["Conv", "Relu"], ops  # BatchNorm folded, Identity gone
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = execution.session(proto).run(None, {"x": x})[0]
    actual = execution.session(model).run(None, {"x": x})[0]
    # BN folding reassociates a few float32 products: round-off level, well under 1e-5 relative.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(execution.to_proto(model), full_check=True)


def test_a_zero_pad_folds_into_a_valid_conv(tmp_path: Path) -> None:
    """TF-style "same" padding as Hugging Face's EfficientNet exports it: a zero Pad at the end of H and W, then
    a strided Conv with auto_pad VALID. VALID is written as explicit zero pads, and the Pad folds into them."""
    rng = np.random.default_rng(0)
    weights = "{" + ", ".join(f"{value:.4f}" for value in rng.standard_normal(4 * 3 * 3 * 3)) + "}"
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 4, 4] y)
      <float[4, 3, 3, 3] w = {weights}, int64[8] p = {{0, 0, 0, 0, 0, 0, 1, 1}}, float c = {{0.0}}> {{
        padded = Pad <mode = "constant"> (x, p, c)
        y = Conv <auto_pad = "VALID", strides = [2, 2]> (padded, w)
    }}
    """
    proto = parse_model(text)
    model = frontend.load(save_model(proto, tmp_path / "pad_conv.onnx"))
    (conv,) = list(model.graph)
    assert conv.op_type == "Conv" and list(conv.attributes["pads"].as_ints()) == [0, 0, 1, 1]
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = execution.session(proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(execution.session(model).run(None, {"x": x})[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_becomes_explicit_pads(tmp_path: Path, mode: str) -> None:
    """auto_pad SAME on a strided conv and a max pool over a 7 x 7 map: explicit pads as the spec defines them
    (2 in total per axis, the odd one at the end for UPPER, at the start for LOWER), same outputs."""
    rng = np.random.default_rng(0)
    weights = "{" + ", ".join(f"{value:.4f}" for value in rng.standard_normal(4 * 3 * 4 * 4)) + "}"
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 3, 7, 7] x) => (float[1, 4, 2, 2] y)
      <float[4, 3, 4, 4] w = {weights}> {{
        c = Conv <auto_pad = "{mode}", strides = [2, 2]> (x, w)
        y = MaxPool <auto_pad = "{mode}", kernel_shape = [3, 3], strides = [2, 2]> (c)
    }}
    """
    proto = parse_model(text)
    model = frontend.load(save_model(proto, tmp_path / "same.onnx"))
    conv, pool = list(model.graph)
    assert "auto_pad" not in conv.attributes and "auto_pad" not in pool.attributes
    begin, end = (1, 2) if mode == "SAME_UPPER" else (2, 1)
    assert list(conv.attributes["pads"].as_ints()) == [begin, begin, end, end]
    x = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
    expected = execution.session(proto).run(None, {"x": x})[0]
    np.testing.assert_allclose(execution.session(model).run(None, {"x": x})[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 17])
def test_reduction_axes_move_to_an_input_at_the_canonical_opset(tmp_path: Path, opset: int) -> None:
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[1, 3, 4, 4] x) => (float[1, 3] y, float[1, 1, 4, 4] z) {{
        y = ReduceMean <axes = [2, 3], keepdims = 0> (x)
        z = ReduceMax <axes = [1]> (x)
    }}
    """
    path = save_model(parse_model(text), tmp_path / "reduce.onnx")
    model = frontend.load(path)
    assert all("axes" not in node.attributes and len(node.inputs) == 2 for node in model.graph)
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32)
    y, z = execution.session(model).run(None, {"x": x})  # onnxruntime rejected the attribute at opset 18
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-6, atol=1e-7)  # summation order differs
    np.testing.assert_array_equal(z, x.max(axis=1, keepdims=True))


def test_constant_nodes_become_initializers(tmp_path: Path) -> None:
    proto = parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x) => (float[2, 3] y) {
        w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
        d = Dropout (x)
        y = Mul (d, w)
    }""")
    model = frontend.load(save_model(proto, tmp_path / "constant.onnx"))
    assert [node.op_type for node in model.graph] == ["Mul"]
    assert any(value.const_value is not None for value in model.graph.initializers.values())


DYNAMIC = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 4] x) => (float[N, 2] y) <float[4, 2] w = {1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5}> {
    y = MatMul (x, w)
}
"""


def test_dynamic_dims_need_input_shape(tmp_path: Path) -> None:
    path = save_model(parse_model(DYNAMIC), tmp_path / "dynamic.onnx")
    with pytest.raises(UnsupportedModelError, match=r"input 'x' .*unknown dims.*--input-shape x="):
        frontend.load(path)
    model = frontend.load(path, frontend.parse_input_shapes(["x=3x4"]))
    assert list(model.graph.inputs[0].shape) == [3, 4]
    assert list(model.graph.outputs[0].shape) == [3, 2]


def test_dynamic_dims_come_from_the_first_sample(tmp_path: Path) -> None:
    """No --input-shape: the first calibration sample fixes the dims, --input-shape still overrides, and the
    manifest records which came from where."""
    from qcompile import api

    path = save_model(parse_model(DYNAMIC), tmp_path / "dynamic.onnx")
    model = frontend.load(path, sample={"x": np.ones((3, 4), np.float32)})
    assert list(model.graph.inputs[0].shape) == [3, 4] and list(model.graph.outputs[0].shape) == [3, 2]
    with pytest.raises(CalibrationError, match=r"declared \[N, 4\], but the first calibration sample has shape"):
        frontend.load(path, sample={"x": np.ones((3, 5), np.float32)})
    samples = [{"x": np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)} for seed in range(4)]
    manifest = api.compile(path, tmp_path / "out", calibration_data=samples, build_tvm=False, progress=False)
    entry = manifest["passes"][0]
    assert entry == {
        "name": "input_shapes",
        "given": {},
        "from_first_sample": {"x": [2, 4]},
        "dynamic_in_onnxruntime": {"x": {"0": "N"}},
        "kept_static": {},
    }
    assert manifest["inputs"][0]["shape"] == [2, 4]


SUMMED = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[N, 2, H, W] x) => (float[N, 3, 1, 1] y)
  <float[4, 2, 1, 1] w1 = {0.5, -0.25, 0.75, 0.5, -0.5, 1.0, 0.25, 0.5}, float[3, 4, 1, 1] w2 = {0.2, -0.4, 0.6, 0.1,
   0.3, 0.5, -0.2, 0.4, -0.6, 0.1, 0.3, 0.2}, int64[2] axes = {2, 3}> {
    c1 = Conv (x, w1)
    s = ReduceSum <keepdims: int = 1> (c1, axes)
    y = Conv (s, w2)
}
"""


def test_a_dim_whose_other_sizes_leave_the_calibrated_ranges_stays_static(tmp_path: Path) -> None:
    """A sum over H x W grows with the image: int8 ranges calibrated on 5x5 images clip it at 10x10, so H and W
    stay fixed, with the reason; the batch, which changes no sample's activations, is kept."""
    from qcompile import api, runtime

    path = save_model(parse_model(SUMMED), tmp_path / "summed.onnx")
    rng = np.random.default_rng(0)
    samples = [{"x": np.abs(rng.standard_normal((1, 2, 5, 5))).astype(np.float32)} for _ in range(8)]
    manifest = api.compile(path, tmp_path / "out", calibration_data=samples, build_tvm=False, progress=False)
    entry = manifest["passes"][0]
    assert entry["dynamic_in_onnxruntime"] == {"x": {"0": "N"}}
    assert set(entry["kept_static"]) == {"H", "W"}
    assert all("far less accurate" in why and "calibrate on samples" in why for why in entry["kept_static"].values())
    session = runtime.load(tmp_path / "out", "onnxruntime")
    assert session.run({"x": np.concatenate([samples[0]["x"]] * 3)})["y"].shape == (3, 3, 1, 1)


def test_shapes_inference_cannot_tell_are_observed(tmp_path: Path) -> None:
    """A Reshape to a shape computed from data (here, the max of an input) leaves onnx's inference without a
    shape for the MatMul after it; a run on the sample gives it."""
    proto = parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 8] x, int64[2] s) => (float[4, 2] y) <float[2, 2] w = {1.0, 2.0, 3.0, 4.0}> {
        r = Reshape (x, s)
        y = MatMul (r, w)
    }""")
    path = save_model(proto, tmp_path / "reshape.onnx")
    with pytest.raises(UnsupportedModelError, match="unknown shape"):
        frontend.load(path)
    sample = {"x": np.arange(8, dtype=np.float32)[None], "s": np.array([4, 2], np.int64)}
    model = frontend.load(path, sample=sample)
    matmul = next(node for node in model.graph if node.op_type == "MatMul")
    assert list(matmul.inputs[0].shape) == [4, 2] and list(matmul.outputs[0].shape) == [4, 2]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opset_23_gelu_and_rms_norm_are_decomposed_exactly(tmp_path: Path, approximate: str) -> None:
    """Gelu (opset 20) and RMSNormalization (23) have no older form: written out in opset-18 ops, the model
    computes what onnx's reference computes at opset 23 (to float32 round-off: 2e-6)."""
    from onnx.reference import ReferenceEvaluator

    scale = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "s")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Gelu", ["x"], ["g"], approximate=approximate),
            onnx.helper.make_node("RMSNormalization", ["g", "s"], ["y"], epsilon=1e-6),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [scale],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])
    path = save_model(proto, tmp_path / "opset23.onnx")
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32) * 2
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    model = frontend.load(path)
    assert model.opset_imports[""] == 18 and not {"Gelu", "RMSNormalization"} & {n.op_type for n in model.graph}
    np.testing.assert_allclose(execution.session(model).run(None, {"x": x})[0], expected, atol=2e-6, rtol=0)


ATTENTION_CASES = {
    # name: (rank, query heads, K/V heads, past length, attributes)
    "4d": (4, 2, 2, 0, {}),
    "4d-causal": (4, 2, 2, 0, {"is_causal": 1}),
    "4d-cache-causal": (4, 2, 2, 3, {"is_causal": 1}),
    "4d-grouped-cache": (4, 4, 2, 3, {"is_causal": 1}),
    "3d-grouped": (3, 4, 2, 0, {"q_num_heads": 4, "kv_num_heads": 2}),
    "3d-cache-softcap": (3, 2, 2, 2, {"q_num_heads": 2, "kv_num_heads": 2, "softcap": 2.0, "scale": 0.3}),
}


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_opset_23_attention_is_decomposed(tmp_path: Path, mask: str, case: str) -> None:
    """Attention (opset 23, as torch's exporter writes scaled_dot_product_attention there) written out in opset-18
    ops computes what onnx's reference computes, present K / V included: 3-D and 4-D, with a boolean or additive
    mask, causal or not, with a KV cache, grouped K/V heads and softcap, and 0 for a query row whose keys are all
    masked (to float32 round-off of a 9-term softmax and dot product: 1e-5). The lengths stay dynamic."""
    from onnx.reference import ReferenceEvaluator

    rank, q_heads, kv_heads, past, attributes = ATTENTION_CASES[case]
    rng = np.random.default_rng(0)
    length, size = 6, 4

    def shape(heads: int, sequence: str | int) -> list[int | str]:
        return ["B", sequence, heads * size] if rank == 3 else ["B", heads, sequence, size]

    def info(name: str, dims: list[int | str], kind: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(name, kind, dims)

    inputs = [info("q", shape(q_heads, "S")), info("k", shape(kv_heads, "S")), info("v", shape(kv_heads, "S"))]
    concrete = {"B": 1, "S": length, "P": past, "T": past + length}
    feed = {
        value.name: rng.standard_normal(
            [concrete.get(d.dim_param, d.dim_value) for d in value.type.tensor_type.shape.dim]
        ).astype(np.float32)
        for value in inputs
    }
    names, outputs = ["q", "k", "v", ""], [info("y", shape(q_heads, "S"))]
    if mask != "none":
        kind = onnx.TensorProto.BOOL if mask == "bool" else onnx.TensorProto.FLOAT
        inputs.append(info("m", ["B", 1, "S", "T" if past else "S"], kind))
        keep = rng.random((1, 1, length, past + length)) > 0.3
        keep[..., 0] = True
        keep[..., 2, :] = False  # every key masked from query 2: the op gives 0 there
        feed["m"] = keep if mask == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
        names[3] = "m"
    if past:
        for name in ("past_k", "past_v"):
            inputs.append(info(name, ["B", kv_heads, "P", size]))
            feed[name] = rng.standard_normal((1, kv_heads, past, size)).astype(np.float32)
        names += ["past_k", "past_v"]
        outputs += [info("present_k", ["B", kv_heads, "T", size]), info("present_v", ["B", kv_heads, "T", size])]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Attention", names, [o.name for o in outputs], **attributes)], "g", inputs, outputs
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])
    path = save_model(proto, tmp_path / "attention.onnx")
    expected = ReferenceEvaluator(proto).run(None, feed)
    model = frontend.load(path, sample=feed)
    assert model.opset_imports[""] == 18 and "Attention" not in {node.op_type for node in model.graph}
    got = execution.session(model).run(None, feed)
    assert len(got) == len(expected)
    for value, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(value, reference, atol=1e-5, rtol=0)


def test_minus_inf_mask_fill_is_accepted(tmp_path: Path) -> None:
    """An attention-style mask fill of -inf (read by Where) is not a weight: the model loads and runs."""
    proto = parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 4] x, bool[1, 4] m) => (float[1, 4] y) <float[1] fill = {-inf}> {
        masked = Where (m, x, fill)
        y = Softmax <axis = -1> (masked)
    }""")
    model = frontend.load(save_model(proto, tmp_path / "mask.onnx"))
    mask = np.array([[True, True, False, True]])
    y = execution.session(model).run(None, {"x": np.zeros((1, 4), np.float32), "m": mask})[0]
    np.testing.assert_allclose(y, [[1 / 3, 1 / 3, 0.0, 1 / 3]], atol=1e-7)


def test_input_shape_errors(tmp_path: Path) -> None:
    path = save_model(parse_model(DYNAMIC), tmp_path / "dynamic.onnx")
    with pytest.raises(UnsupportedModelError, match="not an input"):
        frontend.load(path, {"nope": (1, 4)})
    with pytest.raises(UnsupportedModelError, match="fixed at 4"):
        frontend.load(path, {"x": (1, 5)})
    with pytest.raises(UnsupportedModelError, match="NAME=D1xD2"):
        frontend.parse_input_shapes(["x=1xa"])


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    proto = conv_bn_model(18)
    path = tmp_path / "ext.onnx"
    proto.ir_version = 10
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    model = frontend.load(path)
    assert [node.op_type for node in model.graph] == ["Conv", "Relu"]


def test_external_data_through_escaping_symlink_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "model"
    outside.mkdir()
    inside.mkdir()
    proto = conv_bn_model(18)
    proto.ir_version = 10
    onnx.save(proto, str(outside / "m.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    (inside / "w.data").symlink_to(outside / "w.data")
    (inside / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    with pytest.raises(UnsafeModelError, match="outside"):
        frontend.load(inside / "m.onnx")


def test_efficientnet_normalizes(efficientnet: Path) -> None:
    model = frontend.load(efficientnet)
    ops = {node.op_type for node in model.graph}
    assert "Conv" in ops and "BatchNormalization" not in ops and "Constant" not in ops
    assert all(value.shape is not None for node in model.graph for value in node.outputs)


def test_tied_lm_head_gets_its_own_transposed_weight(tmp_path: Path) -> None:
    """An LM head tied to the embedding table reads ``Transpose(table)``; folding skips tensors this large, so
    the frontend folds it itself: the head's MatMul gets a constant weight (quantized as a weight, per
    channel), the Gather keeps the table, and the outputs are unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    vocab, width = 1100, 1000  # 1.1M elements, over onnxscript's folding limit
    table = np.random.default_rng(0).standard_normal((vocab, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["hidden"]),
            helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0]),
            helper.make_node("MatMul", ["hidden", "head"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, vocab])],
        [numpy_helper.from_array(table, "table")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = frontend.load(save_model(proto, tmp_path / "tied.onnx"))
    assert [node.op_type for node in model.graph] == ["Gather", "MatMul"]
    head = next(node for node in model.graph if node.op_type == "MatMul").inputs[1]
    assert head is not None and head.const_value is not None and head.shape == (width, vocab)
    ids = {"ids": np.array([[0, 5, 77, 1099]], np.int64)}
    expected = execution.session(proto).run(None, ids)[0]
    np.testing.assert_array_equal(execution.session(model).run(None, ids)[0], expected)


def test_weights_split_and_transposed_at_run_time_are_folded(tmp_path: Path) -> None:
    """A SigLIP pooling head splits its packed ``in_proj_weight`` and transposes each part at run time: the
    Split and Transposes fold (beyond onnxscript's 1024-element limit), so each MatMul reads a constant weight
    that is quantized as one. The outputs are unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    packed = np.random.default_rng(1).standard_normal((96, 32)).astype(np.float32)  # 3072 elements
    nodes = [helper.make_node("Split", ["packed", "sizes"], ["wq", "wk", "wv"], axis=0)]
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("Transpose", [f"w{name}"], [f"w{name}_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", f"w{name}_t"], [name]),
        ]
    graph = helper.make_graph(
        nodes,
        "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 32])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 5, 32]) for name in "qkv"],
        [numpy_helper.from_array(packed, "packed"), numpy_helper.from_array(np.array([32, 32, 32], np.int64), "sizes")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = frontend.load(save_model(proto, tmp_path / "packed.onnx"))
    assert [node.op_type for node in model.graph] == ["MatMul"] * 3
    assert all(node.inputs[1] is not None and node.inputs[1].const_value is not None for node in model.graph)
    feed = {"x": np.random.default_rng(2).standard_normal((1, 5, 32)).astype(np.float32)}
    for ours, expected in zip(
        execution.session(model).run(None, feed), execution.session(proto).run(None, feed), strict=True
    ):
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize(
    ("equation", "shapes", "rewritten"),
    [
        ("bhlk,bhtk->bhlt", [(1, 2, 5, 8), (1, 2, 7, 8)], True),  # CvT's attention scores
        ("bhlt,bhtv->bhlv", [(1, 2, 5, 7), (1, 2, 7, 8)], True),  # and its weighted values
        ("bld,dk->blk", [(1, 5, 8), (8, 6)], True),  # a linear layer: MatMul broadcasts the tokens
        ("bld,bdk->bkl", [(1, 5, 8), (1, 8, 6)], True),
        ("bld,dkm->blkm", [(1, 5, 8), (8, 6, 2)], False),  # two free letters in the second: kept
        ("ij,kj->ki", [(5, 8), (7, 8)], True),  # the result transposed
        ("bii->bi", [(1, 4, 4)], False),  # a diagonal: kept
    ],
)
def test_an_einsum_that_is_a_matrix_product_becomes_matmul(
    tmp_path: Path, equation: str, shapes: list[tuple[int, ...]], rewritten: bool
) -> None:
    """Two-operand Einsums of the batched-matrix-product form become MatMul between Transposes (the
    quantizer and kernels know MatMul); the outputs are as onnxruntime's Einsum computes them (float32 sums
    of at most 8 products in another order: within 1e-5)."""
    from onnx import TensorProto, helper

    names = [f"x{index}" for index in range(len(shapes))]
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in zip(names, shapes, strict=True)}
    expected = np.einsum(equation, *feeds.values())
    graph = helper.make_graph(
        [helper.make_node("Einsum", names, ["y"], equation=equation)],
        "einsum",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
            for name, shape in zip(names, shapes, strict=True)
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(expected.shape))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = frontend.load(save_model(proto, tmp_path / "einsum.onnx"))
    assert ("Einsum" not in [node.op_type for node in model.graph]) == rewritten
    (ours,) = execution.session(model).run(None, feeds)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("block", "strides", "pads", "image", "rewritten"),
    [
        ((2, 2), (2, 2), (0, 0, 0, 0), (8, 6), True),  # torch's nn.Fold as MobileViTv2 uses it: blocks tile the image
        ((2, 3), (2, 3), (0, 0, 0, 0), (4, 9), True),
        ((3, 3), (2, 2), (0, 0, 0, 0), (7, 7), False),  # overlapping blocks are summed: a Col2Im stays
        ((2, 2), (2, 2), (1, 1, 1, 1), (6, 6), False),  # padding is cropped: stays
    ],
)
def test_a_col2im_whose_blocks_tile_the_image_becomes_a_movement(
    tmp_path: Path,
    block: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[int, ...],
    image: tuple[int, int],
    rewritten: bool,
) -> None:
    """Col2Im with non-overlapping, unpadded blocks moves each value to one pixel: it becomes Reshape,
    Transpose, Reshape, and gives onnxruntime's Col2Im outputs exactly (no arithmetic on either side)."""
    from onnx import TensorProto, helper

    channels = 3
    padded = [image[0] + pads[0] + pads[2], image[1] + pads[1] + pads[3]]
    count = ((padded[0] - block[0]) // strides[0] + 1) * ((padded[1] - block[1]) // strides[1] + 1)
    shape = [2, channels * block[0] * block[1], count]
    graph = helper.make_graph(
        [helper.make_node("Col2Im", ["x", "image", "block"], ["y"], strides=list(strides), pads=list(pads))],
        "col2im",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, channels, *image])],
        [
            helper.make_tensor("image", TensorProto.INT64, [2], list(image)),
            helper.make_tensor("block", TensorProto.INT64, [2], list(block)),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = frontend.load(save_model(proto, tmp_path / "col2im.onnx"))
    assert ("Col2Im" not in [node.op_type for node in model.graph]) == rewritten
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    expected = execution.session(proto).run(None, {"x": x})[0]
    (ours,) = execution.session(model).run(None, {"x": x})
    np.testing.assert_array_equal(ours, expected)
