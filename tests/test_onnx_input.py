"""ONNX files as compile input: untrusted loading, shapes, fidelity, and the policy search end to end."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.cli import main
from edgec.compile.export import export_onnx
from edgec.compile.source import fidelity, load_inputs, load_untrusted, prepare_source
from edgec.errors import DataError, ModelError
from edgec.search.space import BlockConfig, SubnetConfig
from edgec.search.supernet import extract_subnet


@pytest.fixture
def user_model(randomized_supernet, tmp_path):
    """A small conv net exported by someone else: an ONNX file and no edgec metadata."""
    ops = ["k3_e3", "skip", "k3_e1", "skip", "skip", "k3_e1", "skip", "skip"]
    static = extract_subnet(randomized_supernet, SubnetConfig(tuple(BlockConfig.from_name(o) for o in ops),
                                                             (16, 32, 64))).fused()
    path = export_onnx(static, (1, 8, 8), tmp_path / "user.onnx")
    model = onnx.load(str(path))
    for node in model.graph.node:  # users' exports often have empty or generic node names
        node.name = ""
    onnx.save(model, str(path))
    return path


def _matmul_model(shape, weight_location=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    if weight_location is not None:
        w.ClearField("float_data")
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=weight_location)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "missing.bin"])
def test_external_data_outside_the_model_folder_is_refused(location, tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 48)
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "m.onnx"
    with open(path, "wb") as f:
        f.write(_matmul_model([1, 4], weight_location=location).SerializeToString())
    with pytest.raises(ModelError, match="external data must be a regular file inside the model's folder"):
        load_untrusted(path)


def test_garbage_file_is_one_line_model_error(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(ModelError) as info:
        load_untrusted(path)
    assert "\n" not in info.value.line()


def test_dynamic_dimension_needs_an_input_shape(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(_matmul_model(["batch", "features"]), str(path))
    with pytest.raises(ModelError, match="dynamic dimension 1 \\(features\\).*--input-shape"):
        prepare_source(path, tmp_path / "out.onnx")
    src = prepare_source(path, tmp_path / "out.onnx", input_shape=(1, 4))
    assert src.input_shape == (None, 4) and len(src.layers) == 1


def test_prepare_names_layers_and_checks_inputs(user_model, tmp_path, images8):
    src = prepare_source(user_model, tmp_path / "src.onnx")
    assert src.input_shape == (None, 1, 8, 8) and len(src.layers) == len(set(src.layers)) > 3
    np.savez(tmp_path / "bad.npz", x=images8[:, :, :4])
    with pytest.raises(DataError, match="has shape"):
        load_inputs(tmp_path / "bad.npz", src, "calibration data", 256)
    np.savez(tmp_path / "few.npz", x=images8[:10])
    with pytest.raises(DataError, match="10 samples"):
        load_inputs(tmp_path / "few.npz", src, "calibration data", 256)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError):  # never unpickled
        load_inputs(tmp_path / "obj.npy", src, "calibration data", 1)


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 10))
    same = fidelity(ref, ref.copy())
    assert same["top1_agreement"] == 1.0 and same["cosine_similarity"] == pytest.approx(1.0)
    assert same["metric"] == "top1_agreement" and same["max_abs_error"] == 0.0
    flipped = ref.copy()
    flipped[:10] = -flipped[:10]
    f = fidelity(ref, flipped)
    assert f["top1_agreement"] <= 0.9 + 1e-9 and f["cosine_similarity"] == pytest.approx(0.8)
    img = rng.random((4, 3, 8, 8))
    noisy = fidelity(img, img + 0.01)
    assert noisy["metric"] == "cosine_similarity" and 35 < noisy["psnr_db"] < 45


@pytest.mark.slow
def test_compile_an_onnx_file_searches_policies_and_publishes(user_model, images8, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", x=images8)
    np.savez(tmp_path / "eval.npz", x=images8[:100])
    out = tmp_path / "run"
    code = main(["compile", str(user_model), "--calib-data", str(tmp_path / "calib.npz"), "--eval-data",
                 str(tmp_path / "eval.npz"), "--budget-evals", "5", "--out", str(out), "--max-accuracy-drop", "100"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["quality"].startswith("fidelity to the FP32 model (top1_agreement)")
    assert report["reference"]["val_accuracy"] == 1.0   # the FP32 model agrees with itself
    assert len(report["evaluations"]) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = [a for a in manifest["artifacts"] if a["chosen"]]
    assert len(chosen) == 1 and chosen[0]["quality"]["fidelity"]["metric"] == "top1_agreement"
    assert (out / chosen[0]["path"]).is_file()
    assert all(a["config"] == {"blocks": [], "widths": []} for a in manifest["artifacts"])


def test_onnx_input_without_calibration_data_is_a_one_line_error(user_model, capsys):
    assert main(["compile", str(user_model)]) == 2
    err = capsys.readouterr().err
    assert "--calib-data" in err and err.count("\n") == 1


def test_npy_inputs_and_contradicting_input_shape(user_model, tmp_path, images8):
    src = prepare_source(user_model, tmp_path / "src.onnx")
    np.save(tmp_path / "calib.npy", images8)
    assert load_inputs(tmp_path / "calib.npy", src, "calibration data", 256).shape == (300, 1, 8, 8)
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(DataError, match="cannot read calibration data"):
        load_inputs(tmp_path / "text.npz", src, "calibration data", 1)
    with pytest.raises(ModelError, match="the model fixes it to 1"):
        prepare_source(user_model, tmp_path / "src2.onnx", input_shape=(1, 3, 8, 8))


@pytest.mark.parametrize("batch", ["batch", 1])
def test_cpu_recipe_follows_the_models_input_name_and_fixed_batch(batch, tmp_path, images8):
    from edgec.compile.quantize import quantize_qdq, weight_precisions

    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32), "w")
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["pixels", "w"], ["y"], name="fc")],
                                                "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    quantize_qdq(tmp_path / "m.onnx", tmp_path / "q.onnx", ("fc",), images8.reshape(300, 64))
    assert weight_precisions(onnx.load(str(tmp_path / "q.onnx"))) == {"fc": "int8"}


def test_a_model_onnx_runtime_cannot_run_is_one_line(tmp_path, images8, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    w = numpy_helper.from_array(np.ones((64, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("FooOp", ["h"], ["y"], domain="com.bogus")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.bogus", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    np.savez(tmp_path / "c.npz", x=images8.reshape(300, 64))
    out = tmp_path / "run"
    assert main(["compile", str(tmp_path / "custom.onnx"), "--calib-data", str(tmp_path / "c.npz"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ONNX Runtime cannot load" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_htp_refuses_control_flow_in_a_users_model_up_front_naming_it(tmp_path, images8, capsys):
    from edgec.targets import get_target

    if not get_target("npu-qnn-htp").availability()[0]:
        pytest.skip("npu-qnn-htp unavailable")
    f = helper.make_tensor_value_info
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["b"])], "b", [], [f("b", TensorProto.FLOAT, [1, 3])])
    w = numpy_helper.from_array(np.ones((64, 3), np.float32), "w")
    c = numpy_helper.from_array(np.array(True), "c")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("If", ["c"], ["y"], name="my_if", then_branch=branch, else_branch=branch)]
    model = helper.make_model(helper.make_graph(nodes, "g", [f("x", TensorProto.FLOAT, ["n", 64])],
                                                [f("y", TensorProto.FLOAT, [1, 3])], [w, c]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "if.onnx"))
    np.savez(tmp_path / "c.npz", x=images8.reshape(300, 64))
    out = tmp_path / "run"
    assert main(["compile", str(tmp_path / "if.onnx"), "--calib-data", str(tmp_path / "c.npz"), "--out", str(out),
                 "--target", "cpu-ort", "--target", "npu-qnn-htp"]) == 2
    err = capsys.readouterr().err
    assert "if.onnx cannot run on npu-qnn-htp: node 'my_if' (If)" in err and err.count("\n") == 1
    assert not out.exists()
