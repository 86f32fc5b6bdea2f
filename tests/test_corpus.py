"""A generated corpus of bad inputs: each must give exit code 2, one line naming what and how to fix,
no traceback, no output folder left behind, and no file read outside the model's folder.

``build_corpus(folder)`` writes every case's files and returns ``(name, argv, expected fragment)``;
the test walks it in-process (``edgec.cli.main``).
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.cli import main

MARKER = "edgec-corpus-payload-ran"


class _Payload:
    """Unpickling this writes a marker file: proof that a pickle was executed."""

    def __reduce__(self):
        return (open, (os.path.join(os.environ.get("EDGEC_CORPUS_DIR", "/tmp"), MARKER), "w"))


def _mlp(path, batch="n", features=64, weight=None, extra_nodes=(), domain_imports=(), inputs=None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    w = weight if weight is not None else numpy_helper.from_array(np.ones((features, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if extra_nodes else "y"], name="fc"), *extra_nodes]
    graph = helper.make_graph(nodes, "g", inputs or [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *domain_imports])
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def _external(folder, name, location, length=None):
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((64, 3), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    if length is not None:
        w.external_data.add(key="length", value=str(length))
    return _mlp(folder / name, weight=w)


def build_corpus(d):
    """Write the corpus under ``d``; returns [(case, argv, expected fragment of the error line)]."""
    rng = np.random.default_rng(0)
    good = _mlp(d / "good.onnx")
    np.savez(d / "calib.npz", x=rng.random((300, 64), dtype=np.float32))
    calib = ["--calib-data", str(d / "calib.npz")]
    out = ["--out", str(d / "out")]
    cases = []

    def case(name, argv, fragment):
        cases.append((name, [str(a) for a in argv], fragment))

    # model files
    raw = good.read_bytes()
    (d / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    case("truncated model", ["compile", d / "truncated.onnx", *calib, *out], "not a readable ONNX model")
    (d / "garbage.onnx").write_bytes(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
    case("corrupted model", ["compile", d / "garbage.onnx", *calib, *out], "ONNX model")
    (d / "empty.onnx").write_bytes(b"")
    case("empty file", ["compile", d / "empty.onnx", *calib, *out], "not found or empty")
    (d / "dir.onnx").mkdir()
    case("directory as model", ["compile", d / "dir.onnx", *calib, *out], "not found or empty")
    secret = d / "secret.bin"
    secret.write_bytes(np.ones((64, 3), np.float32).tobytes())
    case("external data ../", ["compile", _external(d / "m1", "m.onnx", "../secret.bin"), *calib, *out],
         "inside the model's folder")
    case("external data absolute", ["compile", _external(d / "m2", "m.onnx", str(secret)), *calib, *out],
         "inside the model's folder")
    m3 = _external(d / "m3", "m.onnx", "link.bin")
    os.symlink(secret, d / "m3" / "link.bin")
    case("external data symlink", ["compile", m3, *calib, *out], "inside the model's folder")
    m4 = _external(d / "m4", "m.onnx", "hard.bin")
    os.link(secret, d / "m4" / "hard.bin")
    case("external data hardlink", ["compile", m4, *calib, *out], "no links")
    m5 = _external(d / "m5", "m.onnx", "w.bin", length=1 << 40)
    (d / "m5" / "w.bin").write_bytes(np.ones((64, 3), np.float32).tobytes())
    case("external data length past the file", ["compile", m5, *calib, *out], "bad external data bounds")
    custom = _mlp(d / "custom.onnx", extra_nodes=[helper.make_node("FooOp", ["h"], ["y"], domain="com.bogus")],
                  domain_imports=[helper.make_opsetid("com.bogus", 1)])
    case("custom-domain op", ["compile", custom, *calib, *out], "ONNX Runtime cannot load custom.onnx")
    dyn = _mlp(d / "dyn.onnx", features="f", weight=numpy_helper.from_array(np.ones((64, 3), np.float32), "w"))
    case("dynamic dim without a shape", ["compile", dyn, *calib, *out], "--input-shape")
    bomb_w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"")
    case("memory-bomb initializer", ["compile", _mlp(d / "bomb1.onnx", weight=bomb_w), *calib, *out],
         "over edgec's limit")
    bomb_x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1 << 31])]
    case("memory-bomb input", ["compile", _mlp(d / "bomb2.onnx", inputs=bomb_x), *calib, *out], "over edgec's limit")
    branch = helper.make_graph([helper.make_node("Identity", ["h"], ["b"])], "b", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3])])
    cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True), "c"))
    iff = _mlp(d / "if.onnx", extra_nodes=[cond, helper.make_node("If", ["c"], ["y"], name="my_if",
                                                                   then_branch=branch, else_branch=branch)])
    case("If on the NPU", ["compile", iff, *calib, *out, "--target", "npu-qnn-htp"], "node 'my_if' (If)")
    dql = _mlp(d / "dql.onnx", extra_nodes=[helper.make_node("DynamicQuantizeLinear", ["h"], ["q", "s", "z"],
                                                             name="my_dql"),
                                            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])])
    case("dynamic quantization on the NPU", ["compile", dql, *calib, *out, "--target", "npu-qnn-htp"],
         "node 'my_dql' (DynamicQuantizeLinear)")
    with open(d / "payload.pt", "wb") as f:
        pickle.dump(_Payload(), f)
    case("pickle checkpoint as model", ["compile", "--model", d / "payload.pt", *out], "known models")
    case("pickle checkpoint to profile", ["profile", d / "payload.pt"], "not a readable ONNX model")

    # data
    def data_case(name, arrays, fragment, fname="bad.npz"):
        path = d / f"{len(cases)}-{fname}"
        if isinstance(arrays, bytes):
            path.write_bytes(arrays)
        elif fname.endswith(".npy"):
            np.save(path, arrays, allow_pickle=True)
        else:
            np.savez(path, **arrays)
        case(name, ["compile", good, "--calib-data", path, *out], fragment)

    data_case("calibration of the wrong shape", {"x": rng.random((300, 8, 8), dtype=np.float32)}, "has shape")
    data_case("calibration of strings", {"x": np.array([["a"] * 64] * 300)}, "non-numeric")
    nan = rng.random((300, 64), dtype=np.float32)
    nan[3, 3] = np.nan
    data_case("calibration with NaN", {"x": nan}, "non-finite")
    data_case("calibration with Inf", {"x": np.full((300, 64), np.inf, np.float32)}, "non-finite")
    data_case("empty calibration", {"x": np.zeros((0, 64), np.float32)}, "0 samples")
    data_case("too little calibration", {"x": rng.random((10, 64), dtype=np.float32)}, "10 samples")
    data_case("calibration pickle payload", np.array([_Payload()], dtype=object), "never loaded", fname="evil.npy")
    data_case("calibration not numpy", b"hello, not numpy", "cannot read calibration data")
    case("input shape contradicting the model", ["compile", good, *calib, "--input-shape", "1,65", *out],
         "fixes it to 64")
    np.savez(d / "eval8.npz", x=rng.random((20, 8), dtype=np.float32))
    case("evaluation data of the wrong shape", ["compile", good, *calib, "--eval-data", d / "eval8.npz", *out],
         "evaluation data")

    # config and CLI
    (d / "typo.toml").write_text("budget_eval = 3\n")
    case("unknown config key", ["compile", "--config", d / "typo.toml", *out], "did you mean 'budget_evals'")
    (d / "type.toml").write_text('budget_evals = "many"\n')
    case("wrong type", ["compile", "--config", d / "type.toml", *out], "bad type for budget_evals")
    case("contradictory flags", ["compile", "--resume", "--force", *out], "pass only one")
    case("unknown target", ["compile", good, *calib, *out, "--target", "gpu-magic"], "unknown target")
    case("unavailable target", ["compile", good, *calib, *out, "--target", "npu-openvino"], "not available")
    case("unwritable output", ["compile", good, *calib, "--out", "/proc/edgec-run"], "output directory")
    case("negative budget", ["compile", "--budget-evals", "-1", *out], "budget_evals")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return d, build_corpus(d)


def test_the_corpus_has_every_kind_of_case(corpus):
    _, cases = corpus
    assert len(cases) >= 34


def test_every_corpus_case_is_one_clear_line_and_leaves_nothing(corpus, capsys, monkeypatch):
    d, cases = corpus
    monkeypatch.setenv("EDGEC_CORPUS_DIR", str(d))
    failures = []
    for name, argv, fragment in cases:
        code = main(argv)
        err = capsys.readouterr().err
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if err.count("\n") != 1 or not err.startswith("edgec: error: "):
            problems.append(f"not one line: {err[-300:]!r}")
        if fragment not in err:
            problems.append(f"missing {fragment!r}: {err.strip()[:300]}")
        if (d / "out").exists():
            problems.append("left an output folder")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert not (d / MARKER).exists(), "a pickle payload was executed"


def test_no_file_outside_the_model_folder_is_opened(corpus, capsys):
    """An audit hook records every open() while edgec reads models with escaping external data."""
    d, _ = corpus
    opened = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(hook)  # hooks cannot be removed; this one only appends to a list
    secret = os.path.realpath(d / "secret.bin")
    for folder in ("m1", "m2", "m3", "m4"):
        opened.clear()
        assert main(["compile", str(d / folder / "m.onnx"), "--calib-data", str(d / "calib.npz"),
                     "--out", str(d / "out")]) == 2
        capsys.readouterr()
        assert secret not in opened, f"{folder}: read {secret}"
