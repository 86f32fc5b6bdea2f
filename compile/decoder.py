"""Causal LMs to ONNX: optimum's reference export, ONNX Runtime GenAI's fused graph, per-Linear weight precision.

Two exports of the same weights, both checked against PyTorch:

- **reference** (:func:`export_reference`): optimum's ``text-generation-with-past`` export, FP32 —
  the "FP32 ONNX" every number is compared with;
- **deployable** (:func:`build_decoder`): ONNX Runtime GenAI's model builder
  (``onnxruntime_genai.models.builder``) writes the same decoder with fused operators
  (``GroupQueryAttention`` with rotary embedding, ``SkipSimplifiedLayerNormalization``, one QKV
  MatMul per layer): about 340 nodes instead of about 6,000, which measured 33 → 51 decode
  tokens/s at FP32 on 2 cores (SmolLM2-135M). Its quantizer takes a per-node configuration, so
  edgec's precision policy is applied there.

Precision per Linear (:data:`PRECISIONS`): ``int4w`` → 4-bit weight-only ``MatMulNBits`` (block 32,
asymmetric, scales and zero points fitted by the k-quant search ONNX Runtime ports from llama.cpp),
``int8w`` → 8-bit weight-only ``MatMulNBits`` (same blocks), ``fp32`` → unchanged. Activations are
quantized to int8 per block inside the kernel (``accuracy_level`` 4, the CPU setting). The LM head's
weights are shared with the token embedding (``GatherBlockQuantized``) when the model ties them.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgec.errors import ExportError

PRECISIONS = ("int4w", "int8w", "fp32")
BLOCK_SIZE = 32
LM_HEAD = "/lm_head/MatMul"


def layer_nodes(i: int) -> dict[str, list[str]]:
    """The builder's MatMul node names of decoder layer ``i``: ``{"attn": [...], "ffn": [...]}``."""
    p = f"/model/layers.{i}"
    return {"attn": [f"{p}/attn/qkv_proj/MatMul", f"{p}/attn/o_proj/MatMul"],
            "ffn": [f"{p}/mlp/gate_proj/MatMul", f"{p}/mlp/up_proj/MatMul", f"{p}/mlp/down_proj/MatMul"]}


def export_reference(model, out_path: Path, opset: int = 18) -> Path:
    """Export a causal LM (``LlamaForCausalLM``-like, FP32, eval mode) with optimum, task
    ``text-generation-with-past``, into one self-contained ``out_path``. Raises :class:`ExportError`."""
    from edgec.compile.transformer import optimum_export

    return optimum_export(model, out_path, "text-generation-with-past", opset)


def build_decoder(hf_dir: Path, out_dir: Path, layers: int, precision: list[tuple[str, str]] | None = None,
                  lm_head: str = "fp32", inputs_embeds: bool = False) -> Path:
    """Build ``out_dir/model.onnx`` (self-contained) + ``genai_config.json`` from the Hugging Face
    directory ``hf_dir`` with ONNX Runtime GenAI's builder. ``precision[i] = (attention, FFN)`` of layer
    ``i`` and ``lm_head``, each one of :data:`PRECISIONS`; ``None`` builds FP32. Raises :class:`ExportError`
    when the builder fails (one line). ``inputs_embeds=True`` builds the graph without its token embedding
    (input ``inputs_embeds`` (batch, seq, hidden) float32 instead of ``input_ids``; the LM head then keeps
    its own copy of the weights). Model code is never taken from the folder (``hf_remote=False``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig
    from onnxruntime_genai.models import builder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    options: dict = {"hf_remote": False, "shared_embeddings": not inputs_embeds, "exclude_embeds": inputs_embeds,
                     "int4_block_size": BLOCK_SIZE,
                     "int4_accuracy_level": 4, "int4_is_symmetric": False}
    custom, exclude = {}, []
    all_fp32 = precision is None or (lm_head == "fp32" and all(p == ("fp32", "fp32") for p in precision))
    if not all_fp32:
        for i, pair in enumerate(precision):
            names = layer_nodes(i)
            for group, prec in zip(("attn", "ffn"), pair):
                for n in names[group]:
                    if prec == "int8w":
                        custom[n] = {"bits": 8}
                    elif prec == "fp32":
                        exclude.append(n)
        if lm_head == "int8w":
            custom[LM_HEAD] = {"bits": 8}
        elif lm_head == "fp32":
            exclude.append(LM_HEAD)
        # the builder shares the LM head with the embedding in 8 bits only for these algorithm names
        options["int4_algo_config"] = "k_quant_last" if lm_head == "int8w" else "k_quant"
        options["int4_nodes_to_exclude"] = exclude
    # the builder takes no per-node precision, but asks its model class for the quantizer configuration:
    # answer with edgec's policy (the class is found through LlamaModel: the builder imports its
    # modules under a top-level name of its own, not as onnxruntime_genai.models.builders)
    owner = next(c for c in builder.LlamaModel.__mro__ if "make_int4_algo_config" in c.__dict__)
    original = owner.__dict__["make_int4_algo_config"]
    owner.make_int4_algo_config = lambda self, method: KQuantWeightOnlyQuantConfig(customized_weight_config=custom)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _quiet_logs():
            builder.create_model(None, str(hf_dir), str(work), "fp32" if all_fp32 else "int4", "cpu",
                                 str(work / "cache"), num_hidden_layers=layers, **options)
        import onnx

        model = onnx.load(str(work / "model.onnx"))  # reads model.onnx.data beside it
        onnx.save(model, str(out_dir / "model.onnx"))
        shutil.copyfile(work / "genai_config.json", out_dir / "genai_config.json")
    except Exception as e:  # the builder raises many types; one line for the user
        raise ExportError(f"ONNX Runtime GenAI's builder could not build {Path(hf_dir).name}",
                          " ".join(str(e).split())[:300] or log.getvalue()[-300:],
                          "check that transformers loads the folder as a LlamaForCausalLM-like model") from None
    finally:
        owner.make_int4_algo_config = original
        shutil.rmtree(work, ignore_errors=True)
    return out_dir / "model.onnx"


@contextlib.contextmanager
def _quiet_logs():
    """Silence the exporters' and quantizers' logs and warnings (handlers they install keep the original
    stderr, so redirecting the stream alone does not reach them); errors still surface as exceptions."""
    import logging
    import warnings

    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def token_windows(tokenizer, text: str, length: int) -> np.ndarray:
    """``text`` tokenized once and cut into consecutive non-overlapping windows of ``length`` tokens:
    (windows, length) int64 (the tail shorter than a window is dropped)."""
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    n = len(ids) // length
    return ids[: n * length].reshape(n, length)
