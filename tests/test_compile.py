import numpy as np
import onnx
import pytest
import torch

from edgec.compile.export import check_parity, export_onnx, layer_nodes, set_metadata
from edgec.compile.quantize import quantize_qdq, weight_precisions
from edgec.errors import DataError, ExportError
from edgec.search.supernet import extract_subnet


@pytest.fixture
def exported(randomized_supernet, spec8, tmp_path):
    config = spec8.largest()
    static = extract_subnet(randomized_supernet, config).fused()
    return static, export_onnx(static, (1, 8, 8), tmp_path / "fp32.onnx"), config


def test_export_names_layers_and_batch(exported, spec8, images8):
    static, path, config = exported
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert set(layer_nodes(model)) == set(spec8.layers_of(config))
    assert check_parity(static, path, images8[:16]) < 1e-4


def test_parity_check_catches_a_wrong_model(exported, images8):
    static, path, _ = exported
    with torch.no_grad():
        static.classifier.bias.add_(1.0)  # PyTorch now disagrees with the file
    with pytest.raises(ExportError, match="does not match PyTorch"):
        check_parity(static, path, images8[:16])


def test_policy_decides_which_weights_get_qdq(exported, spec8, images8, tmp_path):
    _, path, config = exported
    layers = spec8.layers_of(config)
    int8 = tuple(layers[::3])
    out = quantize_qdq(path, tmp_path / "mixed.onnx", int8, images8)
    precisions = weight_precisions(onnx.load(str(out)))
    assert set(precisions) == set(layers)
    for layer in layers:
        assert precisions[layer] == ("int8" if layer in int8 else "fp32"), layer
    fp32_copy = quantize_qdq(path, tmp_path / "fp32copy.onnx", (), images8)
    assert set(weight_precisions(onnx.load(str(fp32_copy))).values()) == {"fp32"}


def test_quantized_model_stays_close_to_fp32(exported, spec8, images8, tmp_path):
    import onnxruntime as ort

    _, path, config = exported
    out = quantize_qdq(path, tmp_path / "int8.onnx", spec8.layers_of(config), images8)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images8[:64]})[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": images8[:64]})[0]
    assert np.mean(np.argmax(a, 1) == np.argmax(b, 1)) > 0.8


def test_quantize_refuses_bad_inputs(exported, images8, tmp_path):
    _, path, _ = exported
    with pytest.raises(DataError, match="too few calibration images"):
        quantize_qdq(path, tmp_path / "q.onnx", ("stem",), images8[:10])
    with pytest.raises(ExportError, match="lacks: nope"):
        quantize_qdq(path, tmp_path / "q.onnx", ("nope",), images8)


def test_metadata_props(exported):
    _, path, _ = exported
    set_metadata(path, {"edgec_version": "x", "metrics": {"a": 1}})
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["edgec_version"] == "x" and props["metrics"] == '{"a": 1}'
