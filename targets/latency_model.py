"""Latency models for a target: a kernel-level predictor for ONNX graphs (nn-Meter style).

nn-Meter (Zhang et al., "nn-Meter: Towards Accurate Latency Prediction of Deep-Learning Model
Inference on Diverse Edge Devices", MobiSys 2021, §4–5) splits a graph into the *kernels* the
runtime really executes (fused operators), predicts each kernel's latency from its configuration
and sums them. Here, for ONNX Runtime's CPU provider:

1. **Kernels** (:func:`graph_kernels`): the graph, shapes inferred by ``onnx`` at batch 1, is split
   the way ONNX Runtime fuses it (checked against its profiler on our graphs): a Conv / Gemm /
   MatMul with the Relu after it is one kernel; with DequantizeLinear on its activation input and
   QuantizeLinear after it, it is one INT8 kernel (QLinearConv / QGemm); an Add between
   DequantizeLinear and QuantizeLinear is QLinearAdd; a QuantizeLinear or DequantizeLinear left
   between an FP32 and an INT8 region is a kernel of its own (a precision switch; ORT also
   transposes NCHW ↔ NHWC there). A weight's DequantizeLinear folds into its consumer.
   These rules guess; :func:`runtime_view` asks ONNX Runtime instead (it loads the graph and reads
   the optimized graph it writes), and then the INT8 kernels are the ones it really fused, a
   weight DequantizeLinear before a float kernel is a kernel (ORT does not fold it), and its
   layout conversions (Transpose, ReorderInput/Output) are ``layout`` kernels. The latency job uses
   this view (measured on 200 fashion-mnist candidates, 5-fold cross-validation of an earlier fit:
   within ±10 % 36 % → 42 %, RMSPE 26 % → 20 %). OpenVINO's CPU plugin needs no rules:
   :func:`openvino_kernels` reads its compiled runtime graph, which is the fused graph with each
   node's precision; the HTP's kernels follow the FP32 export and the policy (:func:`npu_kernels`).
2. **Kernel class** = op family × precision: ``conv1x1``, ``dwconv`` (depthwise), ``conv`` (other
   kernel sizes), ``gemm``, ``add``, ``pool``, ``quantize``, ``dequantize``, ``layout``, ``other``; each
   kernel's features are its count (1), multiply-accumulates and elements moved (inputs + output).
3. **Regressor** (:class:`KernelPredictor`): a kernel's latency is a non-negative linear function
   of its features, one per class, and a graph's is the sum over its kernels plus a fixed
   per-run overhead. The coefficients are fit on whole graphs measured on the target
   (scikit-learn ``LinearRegression(positive=True)`` on the per-class feature sums), so no
   kernel needs timing in isolation.
4. **Units: ratios to an anchor graph measured side by side.** On a shared machine the absolute
   latency of one graph drifts (measured here: the same subnet 0.256 → 0.110 ms within 90 s, while
   its ratio to another graph measured next to it stayed 0.87 ± 0.01), so every graph is measured
   interleaved with a fixed *anchor* graph and the model predicts the ratio; milliseconds are the
   ratio × the anchor's p50 (as measured at build time, or now).

A fitted model is stored as JSON (coefficients, the samples it was fit on, and the target,
runtime, device and threads it was measured with) — never pickled. Its predictions are
``kind = "predicted"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgec.errors import ConfigError, ModelError

CLASSES = ("conv1x1", "dwconv", "conv", "gemm", "add", "pool", "quantize", "dequantize", "layout", "other")
PRECISIONS = ("fp32", "int8", "int16")  # int16: 16-bit activations (the NPU recipe's "precise" layers)
FEATURES = ("count", "macs", "elements")
FORMAT = "edgec-latency-model/2"  # /2: int16 kernels (the NPU model)


@dataclass(frozen=True)
class Kernel:
    """One kernel as the runtime executes it: ``cls`` (see :data:`CLASSES`), ``precision``
    (fp32 | int8), ``macs`` (multiply-accumulates, batch 1), ``elements`` (input + output tensor
    elements), ``name`` (the anchor node's name)."""

    name: str
    cls: str
    precision: str
    macs: int
    elements: int


def _shapes(model) -> dict[str, tuple[int, ...]]:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:  # batch 1 for every symbolic first dim
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception as e:  # onnx raises several types for broken graphs
        raise ModelError("cannot infer the graph's shapes", " ".join(str(e).split())[:200],
                         "give every input a static shape (batch aside)") from None
    out = {}
    for vi in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for t in m.graph.initializer:
        out[t.name] = tuple(int(d) for d in t.dims)
    return out


QLINEAR_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "MaxPool")
LAYOUT_OPS = ("Transpose", "ReorderInput", "ReorderOutput")


@dataclass(frozen=True)
class RuntimeView:
    """What ONNX Runtime made of a graph at load time: ``int8_nodes`` (names of the original nodes it
    runs as QLinear* kernels) and ``layout_kernels`` (NCHW ↔ NHWC / NCHWc conversions it inserted)."""

    int8_nodes: frozenset
    layout_kernels: int


def runtime_view(path: Path, threads: int = 2) -> RuntimeView:
    """Load ``path`` in ONNX Runtime (CPU provider, all graph optimizations, as the target measures
    it) and read the optimized graph it writes: which nodes became QLinear* kernels (ORT names a
    fused node ``<original name>_token_<n>`` or keeps the name) and how many layout conversions it
    added. Loads the model in this process: for graphs edgec compiled itself.

    Seen with ONNX Runtime 1.32 on QDQ graphs: a Conv with a *float* weight between DequantizeLinear
    and QuantizeLinear is fused into QLinearConv too (ORT's WeightBiasQuantization quantizes the
    weight itself), and an INT8-weight Conv whose bias is not its own quantized bias stays a float
    Conv with its weight dequantized at every run — which the rules alone cannot know."""
    import os
    import re
    import tempfile

    import onnx
    import onnxruntime as ort

    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix="edgec-ortopt-")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = tmp
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(tmp, load_external_data=False)
    finally:
        Path(tmp).unlink(missing_ok=True)
    int8 = frozenset(re.sub(r"_token_\d+$", "", n.name) for n in opt.graph.node
                     if n.op_type in QLINEAR_OPS and n.op_type != "MaxPool")
    return RuntimeView(int8, sum(1 for n in opt.graph.node if n.op_type in LAYOUT_OPS))


def graph_kernels(model, runtime: RuntimeView | None = None) -> list[Kernel]:
    """The kernels of an ONNX model (``onnx.ModelProto`` or path) as ONNX Runtime's CPU provider
    fuses them — rules in the module docstring. With ``runtime`` (:func:`runtime_view`) the INT8
    kernels are the ones ORT really fused, a weight DequantizeLinear feeding a float kernel is a
    kernel of its own (ORT does not fold it), and ORT's layout conversions are ``layout`` kernels.
    Raises :class:`ModelError` when shapes cannot be inferred."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = _shapes(model)
    init = {t.name for t in model.graph.initializer}
    folded = set()  # nodes computing constants only (ORT folds them at load): no kernel
    consts_dq: set[str] = set()  # outputs of weights' DequantizeLinear
    for n in model.graph.node:
        if n.input and all(not i or i in init or i in consts_dq for i in n.input):
            folded.add(n.name)
            if n.op_type == "DequantizeLinear" or any(i in consts_dq for i in n.input):
                consts_dq.update(n.output)  # a dequantized weight (or a copy of one): what QLinear* kernels take
            else:
                init.update(n.output)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def elems(name: str) -> int:
        s = shapes.get(name)
        return int(np.prod(s)) if s else 0

    def from_dq(name: str) -> bool:
        p = producer.get(name)
        return p is not None and p.op_type == "DequantizeLinear" and name not in consts_dq

    def to_q(name: str) -> bool:
        cs = consumers.get(name, [])
        if len(cs) == 1 and cs[0].op_type == "Relu":  # Conv → Relu → Q fuses too
            cs = consumers.get(cs[0].output[0], [])
        return bool(cs) and all(c.op_type == "QuantizeLinear" for c in cs)

    def weight_dq(name: str) -> bool:
        return name in consts_dq

    int8_ops: set[str] = set()  # names of nodes that run as QLinear* kernels
    for n in model.graph.node:
        if runtime is not None:
            if n.name in runtime.int8_nodes:
                int8_ops.add(n.name)
            continue
        if n.op_type in ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool", "AveragePool", "MaxPool"):
            acts = [i for i in n.input if i and i not in init and not weight_dq(i)]
            if n.op_type in ("Conv", "Gemm", "MatMul") and not weight_dq(n.input[1]):
                continue  # an FP32 weight: the float kernel, whatever surrounds it
            if acts and all(from_dq(i) for i in acts) and to_q(n.output[0]):
                int8_ops.add(n.name)

    kernels = []
    for n in model.graph.node:
        op = n.op_type
        if n.name in folded:
            continue
        io = sum(elems(i) for i in n.input if i and i not in init and i not in consts_dq) \
            + sum(elems(o) for o in n.output)
        prec = "int8" if n.name in int8_ops else "fp32"
        if op == "DequantizeLinear":
            cs = consumers.get(n.output[0], [])
            if cs and all(c.name in int8_ops for c in cs):
                continue  # absorbed by the QLinear kernels it feeds
            kernels.append(Kernel(n.name, "dequantize", "int8", 0, io))
        elif op == "QuantizeLinear":
            p = producer.get(n.input[0])
            if p is not None and p.op_type == "Relu":
                p = producer.get(p.input[0])
            if p is not None and p.name in int8_ops:
                continue  # the QLinear kernel writes the quantized tensor itself
            kernels.append(Kernel(n.name, "quantize", "int8", 0, io))
        elif op == "Relu" and producer.get(n.input[0]) is not None and \
                producer[n.input[0]].op_type in ("Conv", "Gemm", "MatMul", "Add"):
            continue  # fused into the kernel before it
        elif op == "Conv":
            w = shapes.get(n.input[1], ())
            out = shapes.get(n.output[0], ())
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if len(w) != 4 or not out:
                raise ModelError(f"cannot size Conv {n.name!r}", "its weight or output shape is unknown",
                                 "export with static shapes")
            macs = int(np.prod(out)) * w[1] * w[2] * w[3]
            cls = "dwconv" if group > 1 and group == w[0] else "conv1x1" if w[2] * w[3] == 1 else "conv"
            kernels.append(Kernel(n.name, cls, prec, macs, io))
            if runtime is not None and prec == "fp32" and weight_dq(n.input[1]):
                kernels.append(Kernel(n.name + "/weight", "dequantize", "int8", 0, 2 * int(np.prod(w))))
        elif op in ("Gemm", "MatMul"):
            a, out = shapes.get(n.input[0], ()), shapes.get(n.output[0], ())
            macs = int(np.prod(out)) * (a[-1] if a else 0)
            kernels.append(Kernel(n.name, "gemm", prec, macs, io))
            if runtime is not None and prec == "fp32" and weight_dq(n.input[1]):
                kernels.append(Kernel(n.name + "/weight", "dequantize", "int8", 0,
                                      2 * int(np.prod(shapes.get(n.input[1], (0,))))))
        elif op == "Add":
            kernels.append(Kernel(n.name, "add", prec, 0, io))
        elif op in ("GlobalAveragePool", "AveragePool", "MaxPool"):
            kernels.append(Kernel(n.name, "pool", prec, 0, io))
        else:
            kernels.append(Kernel(n.name, "other", "fp32", 0, io))
    if runtime is not None:
        kernels += [Kernel(f"layout/{i}", "layout", "fp32", 0, 0) for i in range(runtime.layout_kernels)]
    return kernels


def npu_kernels(fp32_model, int8_layers) -> list[Kernel]:
    """The kernels of a graph as the HTP runs it under edgec's NPU recipe (``qnn-qdq-u8s8-a16``,
    :mod:`edgec.compile.qnn`), from the candidate's FP32 export (``onnx.ModelProto`` or path) and its
    policy: QNN executes each Conv / Gemm with its Relu as one op and absorbs the Q/DQ pairs, so the
    kernels are those of :func:`graph_kernels` on the FP32 graph, each weight layer at its activation
    precision (``int8`` — uint8 activations — for ``int8_layers``, ``int16`` for the others), every other
    kernel at its input's precision (an Add at the wider of its inputs'; the quantized graph input is
    uint8), plus a ``quantize`` kernel (the requantization between 8- and 16-bit activations) wherever a
    kernel's input precision differs from its own. Raises :class:`ModelError` when shapes cannot be
    inferred."""
    import onnx

    if not isinstance(fp32_model, onnx.ModelProto):
        fp32_model = onnx.load(str(fp32_model), load_external_data=False)
    shapes = _shapes(fp32_model)
    int8 = set(int8_layers)
    inits = {t.name for t in fp32_model.graph.initializer}
    precision = {i.name: "int8" for i in fp32_model.graph.input}  # activation precision of each tensor
    node_precision, switches = {}, []
    for n in fp32_model.graph.node:
        ins = [precision[i] for i in n.input if i in precision and i not in inits]
        wider = "int16" if "int16" in ins else "int8" if ins else "int8"
        own = ("int8" if n.name in int8 else "int16") if n.op_type in ("Conv", "Gemm", "MatMul") else wider
        node_precision[n.name] = own
        for i in n.input:
            if i in precision and i not in inits and precision[i] != own:
                switches.append(Kernel(f"{n.name}/requantize", "quantize", own, 0,
                                       2 * int(np.prod(shapes.get(i, (0,))))))
        for o in n.output:
            precision[o] = own
    kernels = [Kernel(k.name, k.cls, node_precision.get(k.name, k.precision), k.macs, k.elements)
               for k in graph_kernels(fp32_model)]
    return kernels + switches


OV_CLASSES = {"Eltwise": "add", "Reduce": "pool", "Pooling": "pool", "Reorder": "layout",
              "FullyConnected": "gemm", "MatMul": "gemm"}


_OV_WORKER = None  # one OpenVINO worker process per edgec process, for the runtime graphs


def _ov_worker():
    global _OV_WORKER
    if _OV_WORKER is None:
        import atexit

        from edgec.targets.worker import Worker

        _OV_WORKER = Worker("edgec.targets.ov_worker")
        atexit.register(_OV_WORKER.close)
    return _OV_WORKER


def openvino_kernels(path: Path, threads: int = 2, device: str = "CPU") -> list[Kernel]:
    """The kernels of an ONNX model as OpenVINO's ``device`` plugin really runs it at batch 1: the
    nodes of the compiled model's runtime graph (``CompiledModel.get_runtime_model()``, read in
    OpenVINO's worker process: :func:`edgec.targets.ov_worker.runtime_graph`), which *is* the fused
    graph — a Convolution node carries its bias, Relu, the residual Add and the FakeQuantize after it
    in ``originalLayersNames`` — each with its ``layerType`` and ``runtimePrecision`` (``u8``/``i8`` →
    ``int8``). Classes: ``Convolution`` → ``conv1x1`` / ``conv`` / ``dwconv`` (grouped weights, one
    rank above the output, with one channel a group), ``FullyConnected``/``MatMul`` → ``gemm``,
    ``Eltwise`` → ``add``, ``Reduce``/``Pooling`` → ``pool``, ``Reorder`` (layout and precision
    conversions) → ``layout``, a ``Subgraph``/``FakeQuantize`` made of a QuantizeLinear → ``quantize``
    (of a DequantizeLinear → ``dequantize``), anything else that runs → ``other``. Nodes computed once
    at compile time (inputs all constant) and the graph's I/O are not kernels. Elements = the
    non-constant inputs' + the output's. Raises :class:`ModelError` when OpenVINO cannot compile the
    graph or a dimension other than the batch is dynamic."""
    from edgec.errors import TargetError
    from edgec.targets.worker import call_for_target

    name = Path(path).name
    if not Path(path).is_file():
        raise ModelError(f"no model file {path}", "it does not exist or is not a file", "check the path")
    try:
        nodes = call_for_target(_ov_worker(), "cpu-openvino", name, "runtime_graph", 120.0, model_path=str(path),
                                device=device, threads=threads)["nodes"]
    except TargetError as e:
        why = e.why.split(": ", 1)[-1]
        raise ModelError(f"OpenVINO cannot compile {name}", why[:200],
                         "give it static shapes (batch aside)" if "dynamic" in why
                         else "check it with 'edgec profile MODEL --target cpu-openvino'") from None
    kernels, constant = [], set()  # names of nodes whose value is fixed at compile time
    for n in nodes:
        layer = n["layer"]
        const = [i in constant for i in n["inputs"]]
        if layer in ("Const", "Constant") or (const and all(const)):
            constant.add(n["name"])  # folded when the model was compiled
            continue
        if layer in ("Input", "Parameter", "Output", "Result"):
            continue
        ins, out = n["input_shapes"], n["output_shape"]
        elements = sum(int(np.prod(s)) for s, c in zip(ins, const) if s and not c) + (int(np.prod(out)) if out else 0)
        prec = "int8" if n["precision"] in ("u8", "i8") else "fp32"
        macs = 0
        if layer == "Convolution":
            w = ins[1] if len(ins) > 1 else []
            if out and len(w) == len(out) + 1:  # grouped: [groups, out/group, in/group, *kernel]
                cls = "dwconv" if w[1] == 1 and w[2] == 1 else "conv"
                macs = int(np.prod(out)) * int(np.prod(w[2:]))
            elif out and len(w) == len(out) >= 3:  # [out, in, *kernel]
                cls = "conv1x1" if int(np.prod(w[2:])) == 1 else "conv"
                macs = int(np.prod(out)) * int(np.prod(w[1:]))
            else:
                raise ModelError(f"cannot size OpenVINO's Convolution {n['name']!r} in {name}",
                                 f"its weight shape {w} does not fit its output shape {out}",
                                 "export it with static shapes")
        elif layer in OV_CLASSES:
            cls = OV_CLASSES[layer]
            if cls == "gemm":
                macs = int(np.prod(out)) * (ins[0][-1] if ins and ins[0] else 0) if out else 0
        elif layer in ("Subgraph", "FakeQuantize"):
            cls = "quantize" if "QuantizeLinear" in n["original"].replace("DequantizeLinear", "") else \
                "dequantize" if "DequantizeLinear" in n["original"] else "other"
        else:
            cls = "other"
        kernels.append(Kernel(n["name"], cls, prec, macs, elements))
    return kernels


def model_kernels(target_name: str, path: Path, threads: int = 2) -> list[Kernel]:
    """The kernels of a compiled ONNX model file as ``target_name``'s runtime runs it: OpenVINO's runtime
    graph on ``cpu-openvino`` (:func:`openvino_kernels`), ONNX Runtime's optimized graph on ``cpu-ort``
    (:func:`graph_kernels` with :func:`runtime_view`). The HTP's kernels need the FP32 export and the
    policy instead (:func:`npu_kernels`): raises :class:`ConfigError` for ``npu-qnn-htp`` and any other
    target."""
    if target_name == "cpu-openvino":
        return openvino_kernels(path, threads)
    if target_name == "cpu-ort":
        return graph_kernels(path, runtime_view(path, threads))
    if target_name == "npu-qnn-htp":
        raise ConfigError("the NPU's kernels are not read from a compiled model",
                          "they follow the candidate's FP32 export and policy", "use npu_kernels(fp32, int8_layers)")
    raise ConfigError(f"no kernel-level latency model for {target_name}",
                      "edgec reads the kernels of cpu-ort, cpu-openvino and npu-qnn-htp only", "use one of those")


def feature_columns() -> list[str]:
    """Names of the aggregated feature vector: ``<class>.<precision>.<feature>``."""
    return [f"{c}.{p}.{f}" for c in CLASSES for p in PRECISIONS for f in FEATURES]


def kernel_features(k: Kernel) -> dict[str, float]:
    """One kernel's non-zero features, keyed as in :func:`feature_columns` (MACs in millions,
    elements in thousands, so coefficients read as ms per MMAC and per k-element)."""
    key = f"{k.cls}.{k.precision}"
    return {f"{key}.count": 1.0, f"{key}.macs": k.macs / 1e6, f"{key}.elements": k.elements / 1e3}


def graph_features(kernels: Sequence[Kernel]) -> np.ndarray:
    """(len(feature_columns()),) float64: the per-class sums of :func:`kernel_features`."""
    cols = {c: i for i, c in enumerate(feature_columns())}
    v = np.zeros(len(cols))
    for k in kernels:
        for name, x in kernel_features(k).items():
            v[cols[name]] += x
    return v


@dataclass
class KernelPredictor:
    """The fitted kernel-level latency model of one target on one machine (module docstring).

    ``meta``: target, runtime, device, threads, space, the anchor and its p50 (``anchor_p50_ms``)
    and when it was built; ``samples``: what it was fit on (``{"id", "features", "ratio", …}``
    each; ``ratio`` = p50 / the anchor's p50 measured side by side)."""

    coef: dict[str, float]
    overhead_ratio: float
    meta: dict[str, Any]
    samples: list[dict] = field(default_factory=list)

    @classmethod
    def fit(cls, samples: Sequence[dict], meta: dict) -> "KernelPredictor":
        """Fit on ``samples`` (``{"features": graph_features(...) as list, "ratio": float}``); the
        loss is relative (each row weighted by 1/ratio²), as the error that matters is relative."""
        from sklearn.linear_model import LinearRegression

        if len(samples) < 10:
            raise ConfigError(f"only {len(samples)} measured graphs to fit a latency model on",
                              "a kernel-level model needs at least 10", "build with more samples")
        x = np.array([s["features"] for s in samples], dtype=np.float64)
        x = np.hstack([x, np.ones((len(x), 1))])  # the per-run overhead: a coefficient kept ≥ 0 like the others
        y = np.array([s["ratio"] for s in samples], dtype=np.float64)
        reg = LinearRegression(positive=True, fit_intercept=False).fit(
            x, y, sample_weight=1.0 / np.maximum(y, 1e-6) ** 2)
        coef = {c: float(w) for c, w in zip(feature_columns(), reg.coef_[:-1]) if w > 0}
        return cls(coef, float(reg.coef_[-1]), dict(meta), list(samples))

    def predict_kernels(self, kernels: Sequence[Kernel]) -> list[float]:
        """Predicted cost of each kernel in anchor units (the overhead excluded)."""
        return [sum(self.coef.get(n, 0.0) * v for n, v in kernel_features(k).items()) for k in kernels]

    def predict_ratio_from_features(self, features: Sequence[float]) -> float:
        """Predicted p50 / anchor p50 from a :func:`graph_features` vector."""
        coef = np.array([self.coef.get(c, 0.0) for c in feature_columns()])
        return self.overhead_ratio + float(np.dot(coef, features))

    def fit_metrics(self) -> dict:
        """:func:`validation_metrics` of the model on the samples it was fit on (noisy measurements
        show here first: a quiet build fits ≈ 96 % of them within ±10 %)."""
        return validation_metrics([s["ratio"] for s in self.samples],
                                  [self.predict_ratio_from_features(s["features"]) for s in self.samples])

    def predict_ratio(self, path: Path) -> float:
        """Predicted p50 of a compiled ONNX model file (batch 1) / the anchor's p50; the kernels are read
        from the model's target's runtime as at build time (:func:`model_kernels`)."""
        kernels = model_kernels(str(self.meta.get("target", "cpu-ort")), path, int(self.meta.get("threads", 2)))
        return self.overhead_ratio + float(sum(self.predict_kernels(kernels)))

    def predict_ms(self, path: Path, anchor_p50_ms: float | None = None) -> float:
        """Predicted p50 latency, ms: :meth:`predict_ratio` × ``anchor_p50_ms`` (default: the anchor's
        p50 when the model was built; pass one measured now on a machine whose speed drifts)."""
        return self.predict_ratio(path) * (anchor_p50_ms or float(self.meta["anchor_p50_ms"]))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "kind": "kernel-level linear (nn-Meter style)", "meta": self.meta,
                "overhead_ratio": self.overhead_ratio, "coef": self.coef, "features": feature_columns(),
                "samples": self.samples}

    def save(self, path: Path) -> Path:
        """Write atomically (a temporary file renamed); raises ``OSError``, leaving nothing behind."""
        return _save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> "KernelPredictor":
        """Raises :class:`ConfigError` for a file that is not an edgec latency model."""
        try:
            text = Path(path).read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(f"cannot read the latency model {path}", e.strerror or str(e),
                              "check its permissions, or rebuild it with 'edgec latency build'") from None
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
            for key in ("coef", "overhead_ratio", "meta", "samples"):
                if key not in d:
                    raise ValueError(f"no {key!r}")
            cols = set(feature_columns())
            coef = {str(k): float(v) for k, v in d["coef"].items()}
            overhead = float(d["overhead_ratio"])
            if not set(coef) <= cols or not all(np.isfinite(v) and v >= 0 for v in (*coef.values(), overhead)):
                raise ValueError("coefficients outside the model's features, or not finite and ≥ 0")
            meta, samples = d["meta"], d["samples"]
            if not isinstance(meta, dict) or not all(k in meta for k in ("target", "threads", "anchor_p50_ms")):
                raise ValueError("'meta' lacks the target, threads or anchor p50")
            if not isinstance(meta.get("anchor", {}), dict) or not isinstance(meta.get("target"), str):
                raise ValueError("'meta' has a target that is not a name or an anchor that is not an object")
            if not isinstance(samples, list) or not samples or not all(
                    isinstance(s, dict) and isinstance(s.get("id"), str) and isinstance(s.get("features"), list)
                    and len(s["features"]) == len(cols)
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
                            for x in s["features"])
                    and isinstance(s.get("ratio"), (int, float)) and np.isfinite(s["ratio"]) and s["ratio"] > 0
                    for s in samples):
                raise ValueError("'samples' is not the list of measured candidates it was fit on")
            if not all(isinstance(meta[k], (int, float)) and np.isfinite(meta[k]) and meta[k] > 0
                       for k in ("anchor_p50_ms", "threads")):
                raise ValueError("'meta' has a non-positive anchor p50 or thread count")
            return cls(coef, overhead, dict(meta), list(samples))
        except RecursionError:
            raise ConfigError(f"{path} is not an edgec latency model", "nested too deeply",
                              "rebuild it with 'edgec latency build'") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path} is not an edgec latency model", str(e)[:200],
                              "rebuild it with 'edgec latency build'") from None


def _save_json(doc: dict, path: Path) -> Path:
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def validation_metrics(measured_ms: Sequence[float], predicted_ms: Sequence[float]) -> dict:
    """``within_10pct`` (fraction of |pred − meas| / meas ≤ 0.10), ``rmspe`` (root mean squared
    relative error, a fraction), ``spearman`` (rank correlation), ``n``."""
    from scipy.stats import spearmanr

    m, p = np.asarray(measured_ms, dtype=np.float64), np.asarray(predicted_ms, dtype=np.float64)
    rel = (p - m) / m
    return {"n": int(len(m)), "within_10pct": float(np.mean(np.abs(rel) <= 0.10)),
            "rmspe": float(np.sqrt(np.mean(rel ** 2))), "spearman": float(spearmanr(m, p).statistic),
            "median_abs_pct_error": float(np.median(np.abs(rel)) * 100)}


LUT_FORMAT = "edgec-latency-lut/1"


def lut_parts(spec, candidate) -> list[tuple[str, float]]:
    """The lookup-table entries a candidate's latency is the sum of, each with its weight: ``(key,
    weight)``. Keys name a part by what fixes its latency — ``stem|<prec>``,
    ``block|<op>|in<c>|out<c>|hw<input side>|s<stride>|<prec>`` (a skipped block has none) and
    ``head|in<c>|<prec>`` (pooling + classifier). A block whose layers mix precisions appears twice,
    as FP32 and as INT8, weighted by the share of its multiply-accumulates in each (a linear
    interpolation the table itself cannot check; validation measures what it costs)."""
    costs = {name: macs for name, macs, _ in spec.layer_costs(candidate.subnet)}

    def split(layers: list[str]) -> list[tuple[str, float]]:
        total = sum(costs[n] for n in layers) or 1
        int8 = sum(costs[n] for n in layers if candidate.policy.precision(n) == "int8") / total
        return [(p, w) for p, w in (("fp32", 1.0 - int8), ("int8", int8)) if w > 0]

    parts = [(f"stem|{p}", w) for p, w in split(["stem"])]
    h = -(-spec.image_size // spec.stem_stride)
    in_c = spec.stem_channels
    for (si, bi), block in zip(spec.block_positions(), candidate.subnet.blocks):
        if block.skip:
            continue
        width, stride = candidate.subnet.widths[si], spec.stages[si].stride if bi == 0 else 1
        layers = [f"stages.{si}.{bi}.{part}" for part in (("expand", "dw", "project") if block.expansion > 1
                                                          else ("dw", "project"))]
        key = f"block|{block.name}|in{in_c}|out{width}|hw{h}|s{stride}"
        parts += [(f"{key}|{p}", w) for p, w in split(layers)]
        h, in_c = -(-h // stride), width
    parts += [(f"head|in{in_c}|{p}", w) for p, w in split(["classifier"])]
    return parts


@dataclass
class BlockLUT:
    """FBNet's latency lookup table (Wu et al., "FBNet: Hardware-Aware Efficient ConvNet Design via
    Differentiable Neural Architecture Search", CVPR 2019, §3.3, eq. 5): every part a subnet can be
    made of (:func:`lut_parts`) measured once on the target at batch 1, alone in its own graph; a
    subnet's latency is the sum of its parts plus a fixed overhead measured on whole subnets (the
    median of measured − summed over them). Units: ratios to the anchor graph measured side by side,
    as :class:`KernelPredictor`. Stored as JSON; predictions are ``predicted``."""

    entries: dict[str, float]
    overhead_ratio: float
    meta: dict[str, Any]

    def missing(self, spec, candidate) -> list[str]:
        return [k for k, _ in lut_parts(spec, candidate) if k not in self.entries]

    def sum_ratio(self, spec, candidate) -> float:
        """Σ of the candidate's parts (no overhead), anchor units. Raises :class:`ModelError` when the
        table lacks a part (built for another space)."""
        missing = self.missing(spec, candidate)
        if missing:
            raise ModelError("the latency lookup table lacks parts of this candidate", f"e.g. {missing[0]}",
                             "rebuild it with 'edgec latency build' for this space")
        return float(sum(self.entries[k] * w for k, w in lut_parts(spec, candidate)))

    def predict_ratio(self, spec, candidate) -> float:
        return self.overhead_ratio + self.sum_ratio(spec, candidate)

    def to_dict(self) -> dict:
        return {"format": LUT_FORMAT, "kind": "per-block lookup table (FBNet)", "meta": self.meta,
                "overhead_ratio": self.overhead_ratio, "entries": self.entries}

    def save(self, path: Path) -> Path:
        """Write atomically (a temporary file renamed); raises ``OSError``, leaving nothing behind."""
        return _save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> "BlockLUT":
        """Raises :class:`ConfigError` for a file that is not an edgec lookup table."""
        try:
            d = json.loads(Path(path).read_text())
            if not isinstance(d, dict) or d.get("format") != LUT_FORMAT:
                raise ValueError(f"format {d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
            number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)  # noqa: E731
            if not isinstance(d["meta"], dict):
                raise ValueError("'meta' is not an object")
            if not isinstance(d["entries"], dict) or not d["entries"] or \
                    not all(number(v) and v >= 0 for v in d["entries"].values()):
                raise ValueError("'entries' must map part names to finite numbers ≥ 0")
            if not number(d["overhead_ratio"]):
                raise ValueError("'overhead_ratio' must be a finite number")
            return cls({str(k): float(v) for k, v in d["entries"].items()}, float(d["overhead_ratio"]),
                       dict(d["meta"]))
        except RecursionError:
            raise ConfigError(f"{path} is not an edgec latency lookup table", "nested too deeply",
                              "rebuild it with 'edgec latency build'") from None
        except OSError as e:
            raise ConfigError(f"cannot read the latency lookup table {path}", e.strerror or str(e),
                              "rebuild it with 'edgec latency build'") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path} is not an edgec latency lookup table", str(e)[:200],
                              "rebuild it with 'edgec latency build'") from None
