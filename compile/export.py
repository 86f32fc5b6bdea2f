"""ONNX export of static subnets, with stable layer names, a parity check and provenance.

The exporter is ``torch.onnx.export`` (TorchScript path, opset 17, batch
dimension named ``batch``). After export each Conv/Gemm node is renamed to the
module path of its layer (``stages.1.0.expand``), read off its weight
initializer, so a :class:`~edgec.search.space.QuantPolicy` addresses ONNX nodes
by the same names it addresses PyTorch modules.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch

from edgec.errors import ExportError
from edgec.targets.worker import DISK_FULL_ERRNOS

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Max |logit difference| allowed between PyTorch and the FP32 ONNX model under
# ONNX Runtime. Both compute in float32; differences come from op ordering and
# are ~1e-6 on these nets, so 1e-3 flags real export bugs, not rounding.
PARITY_ATOL = 1e-3
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def export_onnx(net: torch.nn.Module, input_shape: tuple[int, ...], path: Path,
                output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> Path:
    """Export ``net`` (eval mode, BN already folded) to ``path``.

    ``input_shape``: (C, H, W) of one image; the graph takes ``input (batch, C, H, W)
    float32`` and returns ``logits (batch, num_classes) float32`` — or, for a net that
    returns a tuple, one float32 output per name in ``output_names``, each with the batch
    first. Raises :class:`ExportError`.
    """
    x = torch.zeros(1, *input_shape)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), (x,), str(path), input_names=[INPUT_NAME], output_names=list(output_names),
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as e:  # the exporter raises many unrelated types
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            raise  # the machine's problem, not the candidate's: the CLI says so in one line
        raise ExportError("ONNX export failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "report this with the candidate config") from None
    model = onnx.load(str(path))
    name_layers(model)
    onnx.save(model, str(path))
    return path


def name_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Rename each Conv/Gemm/MatMul node to its layer's module path; returns {layer: op_type}.

    A weight initializer ``stages.1.0.expand.conv.weight`` names layer ``stages.1.0.expand``.
    """
    initializers = {i.name for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            layer = node.input[1].removesuffix(".weight").removesuffix(".conv")
            node.name = layer
            layers[layer] = node.op_type
    return layers


def layer_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """{layer name: node} for the weight-carrying nodes named by :func:`name_layers`."""
    return {n.name: n for n in model.graph.node if n.op_type in WEIGHT_OPS}


def set_metadata(path: Path, metadata: dict) -> None:
    """Write ``metadata`` (values JSON-encoded unless str) into the model's ``metadata_props``."""
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)
    onnx.save(model, str(path))


def check_parity(net: torch.nn.Module, onnx_path: Path, x: np.ndarray, atol: float = PARITY_ATOL) -> float:
    """Max |output difference| between ``net`` and the ONNX model on ``x`` (N, C, H, W) float32,
    over every output for a net that returns a tuple.

    Raises :class:`ExportError` when it exceeds ``atol``.
    """
    import onnxruntime as ort

    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x))
    expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})
    if len(got) != len(expected):
        raise ExportError(f"exported model {onnx_path.name} has {len(got)} outputs", f"PyTorch gives {len(expected)}",
                          "report this with the model")
    diff = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected))
    if not diff <= atol:
        raise ExportError(f"exported model {onnx_path.name} does not match PyTorch",
                          f"max |logit difference| {diff:.2e} > tolerance {atol:.0e}",
                          "report this with the candidate config")
    return diff
