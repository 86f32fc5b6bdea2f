"""A user's ONNX model as compile input: loaded as untrusted, shapes resolved, layers named, fidelity.

The file and its external data are treated as untrusted: external-data locations
must be relative paths that stay inside the model's folder (no absolute paths, no
``..``, no symlink escaping it), the graph must pass ``onnx.checker``, and only one
float input is supported. Quantizable layers are the Conv / Gemm / MatMul nodes whose
second input is an initializer; nodes without a unique name get one
(``<op>_<index>``) so a per-layer policy can address them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgec.compile.export import WEIGHT_OPS
from edgec.errors import DataError, ModelError


@dataclass(frozen=True)
class SourceModel:
    """A prepared source model: ``path`` (self-contained copy), its input (name, shape with the
    batch as ``None``, numpy dtype name), first output (name, rank) and quantizable layers."""

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    output_name: str
    output_rank: int
    layers: tuple[str, ...]


def _tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


MAX_TENSOR_BYTES = 4 << 30   # one initializer or one input sample larger than this is refused (memory bomb)


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    """External data must be a regular, singly linked file inside ``base`` (no absolute path, no
    ``..``, no symlink or hardlink to elsewhere — the bypasses onnx fixed in 1.16 and 1.21), and its
    declared offset/length must lie within that file and match the tensor's declared size."""
    root = base.resolve()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        path = base / location
        resolved = path.resolve()
        if (not location or os.path.isabs(location) or ".." in Path(location).parts or path.is_symlink()
                or not resolved.is_relative_to(root) or not resolved.is_file() or resolved.stat().st_nlink > 1):
            raise ModelError(f"tensor {tensor.name!r} points at external data {location!r}",
                             "external data must be a regular file inside the model's folder (no links)",
                             "re-save the model with its data next to it (onnx.save(..., save_as_external_data=True))")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            offset, length = -1, -1
        size = resolved.stat().st_size
        need = _declared_bytes(tensor)
        if offset < 0 or offset > size or (length >= 0 and (offset + length > size or need is not None
                                                             and length != need)):
            raise ModelError(f"tensor {tensor.name!r} has bad external data bounds",
                             f"offset {info.get('offset', 0)}, length {info.get('length', '-')} in a "
                             f"{size}-byte file for a {need}-byte tensor", "re-save the model")


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and dtype declare (None for strings/unknown types)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n * itemsize


def _check_sizes(model: onnx.ModelProto) -> None:
    """Refuse tensors and inputs whose declared sizes are absurd (memory bombs)."""
    for tensor in _tensors(model.graph):
        need = _declared_bytes(tensor)
        if need is not None and (need > MAX_TENSOR_BYTES or any(d < 0 for d in tensor.dims)):
            raise ModelError(f"tensor {tensor.name!r} declares {list(tensor.dims)}",
                             f"{need} bytes, over edgec's limit of {MAX_TENSOR_BYTES >> 30} GiB per tensor",
                             "check the export")
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:] if d.HasField("dim_value")]
        n = 1
        for d in dims:
            n *= max(d, 1)
        if n * 4 > MAX_TENSOR_BYTES:
            raise ModelError(f"input {value.name!r} declares a sample of {n} elements",
                             f"over edgec's limit of {MAX_TENSOR_BYTES >> 30} GiB per sample", "check the export")


def load_untrusted(path: Path) -> onnx.ModelProto:
    """Load ``path`` and its external data safely; raises :class:`ModelError` in one line."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise ModelError(f"model {path} not found or empty", "edgec needs an ONNX file", "pass a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises assorted types on garbage
        raise ModelError(f"{path} is not a readable ONNX model", type(e).__name__, "pass a valid .onnx file") from None
    _check_external_data(model, path.parent)
    _check_sizes(model)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelError(f"{path} is not a valid ONNX model", " ".join(str(e).split())[:200] or type(e).__name__,
                         "check the export") from None
    return model


def name_layers(model: onnx.ModelProto) -> tuple[str, ...]:
    """Give every node a unique name (in place) and return the quantizable layers' names."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    inits = {t.name for t in model.graph.initializer}
    return tuple(n.name for n in model.graph.node
                 if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits)


def prepare_source(path: Path, out_path: Path, input_shape: tuple[int, ...] | None = None) -> SourceModel:
    """Write a self-contained, layer-named copy of the model at ``path`` to ``out_path``.

    ``input_shape``: a full shape (batch first) for inputs with dynamic dimensions besides the
    batch; without it such a dimension is a :class:`ModelError`.
    """
    model = load_untrusted(path)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise ModelError(f"{path} has {len(inputs)} inputs", "edgec compiles single-input models",
                         "export the model with one input tensor")
    value = inputs[0]
    elem = value.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise ModelError(f"input {value.name!r} of {path} is {onnx.TensorProto.DataType.Name(elem)}",
                         "edgec calibrates and quantizes float32 inputs", "export the model with a float32 input")
    dims = value.type.tensor_type.shape.dim
    if input_shape is not None and len(input_shape) != len(dims):
        raise ModelError(f"--input-shape has {len(input_shape)} dimensions", f"input {value.name!r} has {len(dims)}",
                         "give one size per dimension, batch first")
    shape: list[int | None] = []
    for k, d in enumerate(dims):
        fixed = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        if k and fixed is not None and input_shape is not None and int(input_shape[k]) != fixed:
            raise ModelError(f"--input-shape gives {int(input_shape[k])} for dimension {k} of {value.name!r}",
                             f"the model fixes it to {fixed}", "pass the model's own sizes for fixed dimensions")
        if k == 0:
            shape.append(None)  # the batch: fed as the data comes
        elif fixed is not None:
            shape.append(fixed)
        elif input_shape is not None:
            shape.append(int(input_shape[k]))
            d.Clear()
            d.dim_value = int(input_shape[k])
        else:
            raise ModelError(f"input {value.name!r} of {path} has a dynamic dimension {k} ({d.dim_param or '?'})",
                             "edgec needs static shapes besides the batch",
                             "pass --input-shape with every size (e.g. 1,3,224,224) or export with a fixed shape")
    layers = name_layers(model)
    if not layers:
        raise ModelError(f"{path} has no quantizable layer", "no Conv/Gemm/MatMul node with a constant weight",
                         "edgec's policy search needs conv or linear layers")
    out = model.graph.output[0]
    onnx.save(model, str(out_path))
    return SourceModel(out_path, value.name, tuple(shape), "float32", out.name,
                       len(out.type.tensor_type.shape.dim), layers)


def read_inputs(path: Path, input_name: str, input_shape: tuple, what: str, minimum: int) -> np.ndarray:
    """Model inputs from an ``.npz`` (the array named ``input_name``, or ``x``, or its only array) or an
    ``.npy``, checked against ``input_shape`` (batch first, its size ignored); (N, ...) float32.
    Never unpickles. Raises :class:`DataError` in one line."""
    fix = f"pass an .npz with an array '{input_name}' or 'x' of model inputs (or an .npy)"
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            key, x = "", loaded
        else:
            with loaded as data:
                names = data.files
                key = next((k for k in (input_name, "x", "input") if k in names),
                           names[0] if len(names) == 1 else None)
                if key is None:
                    raise ValueError(f"no array named {input_name!r} or 'x' among {names[:5] or 'no arrays'}")
                x = np.asarray(data[key])
    except ValueError as e:
        why = ("not an .npy/.npz of numbers (pickled object data is never loaded)" if "pickle" in str(e)
               else " ".join(str(e).split())[:200])
        raise DataError(f"cannot read {what} {path}", why, fix) from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {what} {path}", " ".join(str(e).split())[:200] or "empty or truncated file",
                        fix) from None
    want = tuple(input_shape[1:])
    if x.ndim != len(input_shape) or tuple(x.shape[1:]) != want:
        raise DataError(f"{what} {path} has shape {x.shape}", f"the model takes (N, {', '.join(map(str, want))})",
                        "pass inputs shaped like the model's input")
    if len(x) < minimum:
        raise DataError(f"{what} {path} has {len(x)} samples", f"need at least {minimum}", "pass more samples")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise DataError(f"{what} {path} holds non-finite or non-numeric values", "", "pass finite numbers")
    return x.astype(np.float32)


def load_inputs(path: Path, source: SourceModel, what: str, minimum: int) -> np.ndarray:
    """:func:`read_inputs` for a prepared source model."""
    return read_inputs(path, source.input_name, source.input_shape, what, minimum)


def fidelity(reference: np.ndarray, output: np.ndarray) -> dict:
    """How closely ``output`` follows the FP32 ``reference`` (both (N, ...) float).

    Always: mean cosine similarity per sample and max |difference|. Classifier outputs
    (N, classes ≥ 2): top-1 agreement. Image-like outputs (rank 4): PSNR in dB over the
    reference's range. ``score`` is the quality objective: top-1 agreement for classifiers,
    else the mean cosine similarity.
    """
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, np.sum(ref * out, axis=1) / np.maximum(norms, 1e-300), 1.0)
    result = {"cosine_similarity": float(np.mean(cos)), "max_abs_error": float(np.max(np.abs(ref - out)))}
    if reference.ndim == 2 and reference.shape[1] >= 2:
        result["top1_agreement"] = float(np.mean(np.argmax(reference, 1) == np.argmax(output, 1)))
        result["score"], result["metric"] = result["top1_agreement"], "top1_agreement"
    else:
        result["score"], result["metric"] = result["cosine_similarity"], "cosine_similarity"
    if reference.ndim == 4:
        peak = float(np.max(reference) - np.min(reference)) or 1.0
        mse = float(np.mean((ref - out) ** 2))
        result["psnr_db"] = float(10 * np.log10(peak ** 2 / mse)) if mse > 0 else float("inf")
    return result
