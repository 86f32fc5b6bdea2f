"""The NPU and OpenVINO targets: HTP recipe and simulator, refusals, EPContext, OpenVINO parity."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import needs_target
from edgec.compile.export import export_onnx, layer_nodes
from edgec.errors import ConfigError, ModelError
from edgec.search.space import BlockConfig, SubnetConfig
from edgec.search.supernet import extract_subnet
from edgec.targets import get_target

# The HTP computes the same QDQ graph as ONNX Runtime's CPU kernels up to rounding inside its
# fused int kernels: we accept a difference of at most 3 output quantization steps.
HTP_TOLERANCE_STEPS = 3


needs_htp = needs_target("npu-qnn-htp")
needs_openvino = needs_target("cpu-openvino")


@pytest.fixture
def small_fp32(randomized_supernet, spec8, tmp_path):
    ops = ["k3_e3", "k3_e1", "k3_e3", "skip", "skip", "k3_e1", "skip", "skip"]
    config = SubnetConfig(tuple(BlockConfig.from_name(o) for o in ops), (16, 32, 64))
    static = extract_subnet(randomized_supernet, config).fused()
    return export_onnx(static, (1, 8, 8), tmp_path / "fp32.onnx")


@needs_htp
def test_htp_simulator_matches_cpu_on_the_qdq_model(small_fp32, images8, tmp_path):
    from edgec.compile.accuracy import onnx_logits
    from edgec.compile.qnn import quantize_qnn

    from edgec.compile.export import set_metadata

    set_metadata(small_fp32, {"edgec_version": "x", "policy": {"a": "int8"}})  # published models carry metadata
    layers = tuple(layer_nodes(onnx.load(str(small_fp32))))
    path = tmp_path / "htp.onnx"
    io = quantize_qnn(small_fp32, path, layers, images8)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8        # quantized I/O
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1            # static batch
    x = images8[:8]
    target = get_target("npu-qnn-htp")
    try:
        htp = io.dequantize_output(target.run(path, io.quantize_input(x), tmp_path / "work"))
    finally:
        target.close()
    cpu = onnx_logits(path, x, io=io.to_dict())
    fp32 = onnx_logits(small_fp32, x)
    assert np.max(np.abs(htp - cpu)) <= HTP_TOLERANCE_STEPS * io.output_scale
    assert np.mean(np.argmax(htp, 1) == np.argmax(cpu, 1)) >= 0.75
    assert np.max(np.abs(cpu - fp32)) < 0.5 * np.max(np.abs(fp32)) + 1e-6  # quantized, but the same function


@needs_htp
def test_htp_policy_fp32_layers_get_16_bit_activations(small_fp32, images8, tmp_path):
    from edgec.compile.qnn import quantize_qnn

    layers = sorted(layer_nodes(onnx.load(str(small_fp32))))
    int8 = tuple(layers[1:])          # layers[0] stays "FP32" → uint16 activations on the HTP
    quantize_qnn(small_fp32, tmp_path / "m.onnx", int8, images8, quantized_io=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    node = {n.name: n for n in model.graph.node}[layers[0]]
    q = [c for c in consumers[node.output[0]] if c.op_type == "QuantizeLinear"]
    assert q and inits[q[0].input[2]].data_type == TensorProto.UINT16
    other = {n.name: n for n in model.graph.node}[layers[1]]
    q8 = [c for c in consumers[other.output[0]] if c.op_type == "QuantizeLinear"]
    assert q8 and inits[q8[0].input[2]].data_type == TensorProto.UINT8


@needs_htp
def test_htp_profile_reports_cycles_and_full_coverage_and_epcontext_round_trip(small_fp32, images8, tmp_path):
    from edgec.compile.qnn import quantize_qnn

    path = tmp_path / "htp.onnx"
    quantize_qnn(small_fp32, path, tuple(layer_nodes(onnx.load(str(small_fp32)))), images8)
    target = get_target("npu-qnn-htp", runs=3)
    try:
        report = target.profile_model(path, (1, 8, 8))
        files = target.package(path, tmp_path / "pkg")
    finally:
        target.close()
    lat = report["latency"]
    assert lat["kind"] == "simulated" and lat["runs"] == 3
    assert len(lat["extra"]["cycles_runs"]) == 3 and lat["extra"]["cycles_p50"] > 0
    assert lat["p50_ms"] == pytest.approx(lat["extra"]["cycles_p50"] / 1e6)  # at the assumed 1000 MHz
    assert report["npu_coverage"]["npu_node_share"] == 1.0 and report["npu_coverage"]["fallback"] == []
    assert report["top_ops"] and all(op["cycles"] >= 0 for op in report["top_ops"])
    assert files["epcontext"]["max_abs_diff"] == 0.0
    ctx = onnx.load(str(tmp_path / "pkg" / "model_ctx.onnx"))
    assert [n.op_type for n in ctx.graph.node] == ["EPContext"]
    assert any(p.suffix == ".bin" for p in (tmp_path / "pkg").iterdir())


@needs_htp
def test_float_io_model_falls_back_and_is_reported(small_fp32, images8, tmp_path):
    from edgec.compile.qnn import quantize_qnn

    path = tmp_path / "float_io.onnx"
    quantize_qnn(small_fp32, path, tuple(layer_nodes(onnx.load(str(small_fp32)))), images8, quantized_io=False)
    target = get_target("npu-qnn-htp", runs=1, require_full_npu=False)
    try:
        report = target.profile_model(path, (1, 8, 8))
    finally:
        target.close()
    cov = report["npu_coverage"]
    assert cov["npu_node_share"] < 1.0
    assert {f["op"] for f in cov["fallback"]} == {"QuantizeLinear", "DequantizeLinear"}
    # With CPU fallback disabled (the default), the QNN EP takes the boundary Q/DQ nodes itself.
    strict = get_target("npu-qnn-htp", runs=1)
    try:
        assert strict.profile_model(path, (1, 8, 8))["npu_coverage"]["npu_node_share"] == 1.0
    finally:
        strict.close()


def _graph_with(node, inputs, outputs, name="m"):
    return helper.make_model(helper.make_graph([node], name, inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", ["dynamic", "dql", "if"])
def test_htp_refuses_what_it_cannot_run_naming_it(case, tmp_path):
    f = helper.make_tensor_value_info
    if case == "dynamic":
        model = _graph_with(helper.make_node("Relu", ["x"], ["y"], name="relu0"),
                            [f("x", TensorProto.FLOAT, ["batch", 4])], [f("y", TensorProto.FLOAT, ["batch", 4])])
        expect = "input 'x' dim 0 is dynamic"
    elif case == "dql":
        model = _graph_with(helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dq_node"),
                            [f("x", TensorProto.FLOAT, [1, 4])],
                            [f("y", TensorProto.UINT8, [1, 4]), f("s", TensorProto.FLOAT, []),
                             f("z", TensorProto.UINT8, [])])
        expect = "node 'dq_node' (DynamicQuantizeLinear)"
    else:
        branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "b", [],
                                   [f("b", TensorProto.FLOAT, [1, 4])])
        model = _graph_with(helper.make_node("If", ["c"], ["y"], name="branchy", then_branch=branch,
                                             else_branch=branch),
                            [f("c", TensorProto.BOOL, []), f("x", TensorProto.FLOAT, [1, 4])],
                            [f("y", TensorProto.FLOAT, [1, 4])])
        expect = "node 'branchy' (If)"
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="cannot run on npu-qnn-htp") as info:
        get_target("npu-qnn-htp").check_model(path)
    assert expect in str(info.value)


@needs_openvino
def test_openvino_cpu_matches_onnxruntime_on_fp32_and_measures(small_fp32, images8, tmp_path):
    from edgec.compile.accuracy import onnx_logits
    from edgec.compile.nncf_ptq import quantize_nncf

    target = get_target("cpu-openvino", runs=20, warmup_runs=2)
    try:
        ov_out = target.predict(small_fp32, images8[:64])
        report = target.profile_model(small_fp32, (1, 8, 8))
        layers = tuple(layer_nodes(onnx.load(str(small_fp32))))
        q = quantize_nncf(small_fp32, tmp_path / "q.onnx", layers[1:], images8)
        q_out = target.predict(q, images8[:64])
    finally:
        target.close()
    ort_out = onnx_logits(small_fp32, images8[:64])
    assert np.max(np.abs(ov_out - ort_out)) < 1e-4          # FP32 stays FP32 (precision hint f32)
    assert report["latency"]["kind"] == "measured" and report["latency"]["runs"] == 20
    assert report["top_ops"] and report["session_ms"] > 0
    model = onnx.load(str(q))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    assert layers[0] not in {n.input[0].split("/")[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert np.mean(np.argmax(q_out, 1) == np.argmax(ort_out, 1)) > 0.5


def test_unknown_recipe_is_a_config_error(small_fp32, tmp_path, images8):
    from edgec.compile.recipes import build

    with pytest.raises(ConfigError, match="unknown quantization recipe"):
        build("nope", small_fp32, tmp_path / "x.onnx", (), images8)


def test_targets_json_lists_every_target_with_its_recipe_and_kind():
    out = subprocess.run([sys.executable, "-m", "edgec", "targets", "--json"], capture_output=True, text=True,
                         check=True).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) >= {"cpu-ort", "npu-qnn-htp", "cpu-openvino", "npu-openvino"}
    for r in rows.values():
        assert {"available", "why_not", "recipe", "latency_kind", "runtime", "device"} <= set(r)
        assert r["available"] or r["why_not"]
    assert rows["npu-qnn-htp"]["recipe"] == "qnn-qdq-u8s8-a16"
    assert rows["cpu-ort"]["latency_kind"] == "measured"
