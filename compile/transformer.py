"""Transformers to ONNX: export through optimum, per-Linear precision, parity and fidelity.

- Export: optimum's ``onnx_export_from_model`` (task ``feature-extraction`` for encoders) on the
  in-memory (possibly sliced) model; the graph keeps module paths in node names, so Linear
  ``encoder.layer.0.intermediate.dense`` becomes MatMul ``/encoder/layer.0/intermediate/dense/MatMul``
  and a precision policy keyed by module name survives export.
- Precision per Linear and embedding table (:func:`quantize_policy`; a table takes ``int8`` only): ``int8`` → ONNX Runtime dynamic quantization
  (int8 weights per output channel — per tensor lost 3 points of cosine on MiniLM —, activations quantized at run time: ``MatMulInteger`` /
  ``DynamicQuantizeLinear``; on ``cpu-ort`` this measured faster than static QDQ for MiniLM);
  ``int4w`` → 4-bit weight-only ``MatMulNBits`` (ONNX Runtime's ``MatMulNBitsQuantizer``, symmetric,
  block size 32); ``fp32`` untouched.
- Fidelity of a feature-extraction model (:func:`embed_onnx`, :func:`fidelity`): mean-pooled,
  L2-normalized sentence embeddings (as sentence-transformers computes them), compared with the
  FP32 PyTorch model's: mean cosine similarity, and nearest-neighbour agreement (for each sentence,
  the same top-1 neighbour among the others).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgec.errors import ExportError

INT4_BLOCK_SIZE = 32


def linear_matmuls(model) -> dict[str, str]:
    """{module name: node name} for the weight nodes of an exported graph: each Linear's MatMul and each
    embedding table's Gather. The exporter names them by module path, ``/encoder/layer.0/intermediate/
    dense/MatMul`` for module ``encoder.layer.0.intermediate.dense`` and ``/embeddings/word_embeddings/
    Gather`` for ``embeddings.word_embeddings`` (ModuleList indices stay joined with a dot)."""
    init = {t.name for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.name.endswith("/MatMul") and len(n.input) > 1 and n.input[1] in init:
            out[n.name.removesuffix("/MatMul").strip("/").replace("/", ".")] = n.name
        elif n.op_type == "Gather" and n.name.endswith("/Gather") and n.input and n.input[0] in init:
            out[n.name.removesuffix("/Gather").strip("/").replace("/", ".")] = n.name
    return out


def optimum_export(model, out_path: Path, task: str, opset: int = 18) -> Path:
    """Export ``model`` (FP32, eval mode) with optimum's ``onnx_export_from_model`` for ``task`` into one
    self-contained ``out_path``, written atomically. Exporter warnings are silenced; a failure is one
    :class:`ExportError` line."""
    import contextlib
    import io
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    out_path = Path(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_path.parent))
    logging.disable(logging.WARNING)  # the exporter's own handlers keep the original stderr
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_export_from_model(model, tmp, task=task, opset=opset, do_validation=False)
        except Exception as e:  # optimum raises many types; one line for the user
            raise ExportError(f"optimum could not export {type(model).__name__}", " ".join(str(e).split())[:300],
                              "check that the model runs in PyTorch on a tokenized batch") from None
        os.replace(tmp / "model.onnx", out_path)
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def export_encoder(model, out_path: Path, opset: int = 18) -> Path:
    """Export an encoder (``BertModel``-like, FP32, eval mode) with optimum (task ``feature-extraction``,
    dynamic batch and sequence axes) to ``out_path`` (one self-contained .onnx file). Raises
    :class:`ExportError` when optimum fails."""
    return optimum_export(model, out_path, "feature-extraction", opset)


def quantize_policy(fp32_path: Path, out_path: Path, policy: dict[str, str]) -> dict:
    """Apply ``policy`` ({Linear or embedding module name: "fp32" | "int8" | "int4w"}) to ``fp32_path`` and write
    ``out_path``. Returns counts per precision and the names not found in the graph (those stay FP32)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    present = linear_matmuls(model)
    by = {"int8": [], "int4w": []}
    missing = []
    for module, prec in policy.items():
        if prec == "fp32":
            continue
        if module not in present:
            missing.append(module)
            continue
        by[prec].append(present[module])
    work = Path(tempfile.mkdtemp(prefix=".quant-", dir=Path(out_path).parent))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs a pre-processing hint per call through the root logger
    try:
        current = Path(fp32_path)
        if by["int8"]:
            nxt = work / "int8.onnx"
            quantize_dynamic(current, nxt, weight_type=QuantType.QInt8, per_channel=True, nodes_to_quantize=by["int8"],
                             op_types_to_quantize=["MatMul", "Gather"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            current = nxt
        if by["int4w"]:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            m = onnx.load(str(current))
            # the quantizer takes a node when it is listed in nodes_to_include OR its op type is MatMul, so
            # an include list alone quantizes every MatMul: exclude the others by name instead
            keep = [n.name for n in m.graph.node if n.op_type == "MatMul" and n.name not in set(by["int4w"])]
            q = MatMulNBitsQuantizer(m, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True, nodes_to_exclude=keep)
            q.process()
            nxt = work / "int4.onnx"
            q.model.save_model_to_file(str(nxt), use_external_data_format=False)
            current = nxt
        shutil.copyfile(current, out_path)
    finally:
        root.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    return {"int8": len(by["int8"]), "int4w": len(by["int4w"]),
            "fp32": sum(1 for p in policy.values() if p == "fp32") + len(missing), "not_in_graph": missing}


MAX_TOKENS = 128  # texts are truncated to this many tokens wherever edgec scores or calibrates


def tokenize(tokenizer, sentences: list[str], max_length: int = MAX_TOKENS) -> dict:
    """Padded, truncated token arrays (int64 numpy) for ``sentences``."""
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="np"))


def tokenize_torch(tokenizer, sentences: list[str], device="cpu") -> dict:
    """:func:`tokenize` as torch tensors on ``device``."""
    import torch

    return {k: torch.from_numpy(v).to(device) for k, v in tokenize(tokenizer, sentences).items()}


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def embed_onnx(path: Path, tokenizer, sentences: list[str], *, threads: int = 2, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (N, hidden) float32 from an exported encoder through ONNX Runtime CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenize(tokenizer, sentences[i:i + batch_size])
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
        hidden = sess.run(None, feed)[0]
        out.append(_pool(hidden, enc["attention_mask"]))
    return np.concatenate(out)


def embed_torch(model, tokenizer, sentences: list[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (N, hidden) float32 from a PyTorch encoder (mean-pooled, L2-normalized)."""
    import torch

    from edgec.search.elastic_transformer import mean_pool

    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            enc = tokenize_torch(tokenizer, sentences[i:i + batch_size])
            out.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]).numpy())
    return np.concatenate(out)


def fidelity(emb: np.ndarray, ref: np.ndarray) -> dict:
    """``{"cosine": mean cosine similarity to ref, "neighbour_agreement": share of sentences whose
    nearest other sentence is the same as with ref}`` for (N, H) L2-normalized embeddings."""
    cos = float(np.mean(np.sum(emb * ref, axis=1)))
    s_ref, s = ref @ ref.T, emb @ emb.T
    np.fill_diagonal(s_ref, -np.inf)
    np.fill_diagonal(s, -np.inf)
    agree = float(np.mean(np.argmax(s, 1) == np.argmax(s_ref, 1)))
    return {"cosine": cos, "neighbour_agreement": agree}


def check_parity(path: Path, model, tokenizer, sentences: list[str], atol: float = 1e-3) -> float:
    """Max abs difference of sentence embeddings between the FP32 ONNX file and PyTorch on
    ``sentences``. Raises :class:`ExportError` above ``atol``."""
    diff = float(np.max(np.abs(embed_onnx(path, tokenizer, sentences) - embed_torch(model, tokenizer, sentences))))
    if diff > atol:
        raise ExportError(f"the exported encoder differs from PyTorch by {diff:.2e}", f"tolerance {atol:g}",
                          "report this model; export with a different opset may help")
    return diff
