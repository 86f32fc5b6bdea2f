"""Elastic dimensions of a pretrained transformer: depth, attention heads and FFN width per layer.

The SimQ-NAS search space for transformers (Sarah et al., "SimQ-NAS: Simultaneous Quantization
Policy and Neural Architecture Search", 2023, §3; after DynaBERT, Hou et al. NeurIPS 2020): a
sub-network keeps the first ``layers`` layers, the ``heads[i]`` most important attention heads
and the ``ffn[i]`` most important FFN channels of layer ``i``.

How (each step is ours unless named):

1. **Importance** on calibration text (:func:`collect_importance`): an FFN channel scores
   ``mean_t |a_j(t)| · ||W_out[:, j]||₂`` over real (unpadded) tokens — its activation times the
   size of its contribution (as Wanda, Sun et al. 2023, scores weights); a head scores the mean
   L2 norm of what it adds to the residual stream, ``||ctx_h(t) · W_o[:, h]ᵀ||₂``.
2. **Rewiring** (:func:`rewire`, DynaBERT §3.1): heads and channels are permuted in place into
   descending importance — the function is unchanged — so every width is a prefix.
3. **Elastic forward** (:func:`elastic`): hooks zero the dropped heads' context and the dropped
   FFN channels, and the encoder runs only its first layers; zeroing is exactly removal.
4. **Extraction** (:func:`extract`): a sub-network becomes a plain, smaller model — rows and
   columns are sliced out of the weights, so the exported graph is smaller, not masked.
5. **Recovery** (optional): an extracted sub-network's output projections are refit by least squares
   to the FP32 model's block sums (:func:`reconstruct`, Kwon et al. 2022), and it can then be
   distilled from the frozen FP32 model's token states and sentence embeddings (:func:`distill`,
   DynaBERT's losses on one sub-network).

GQA: in a model whose attention has fewer key/value heads than query heads, heads are kept in
whole groups (one KV head with its query heads), so KV groups stay consistent.

Supported layouts: BERT-family encoders (``encoder.layer[i].attention.self.query`` …) and
Llama-family decoders (``model.layers[i].self_attn.q_proj`` …).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from edgec.errors import ModelError

PRECISIONS = ("fp32", "int8", "int4w")


@dataclass(frozen=True)
class LayerRefs:
    """The Linear layers of one transformer block that elastic dims slice. ``q, k, v`` produce
    heads (``head_dim`` columns each; k and v have ``kv_heads`` heads), ``o`` consumes them; ``ffn_in``
    produce FFN channels (one Linear, or gate and up), ``ffn_out`` consumes them. ``attn`` is the
    module holding the per-layer head counts, ``ffn_act`` the module whose output is the FFN
    activation (its last dim is the channel)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    ffn_in: tuple[nn.Linear, ...]
    ffn_out: nn.Linear
    attn: nn.Module
    ffn_act: nn.Module


class Arch:
    """Where the blocks of a supported model live and how their head counts are stored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.ffn = cfg.intermediate_size
        if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
            self.kind, self.container, self.attr = "bert", model.encoder, "layer"
        elif hasattr(model, "model") and hasattr(model.model, "layers"):  # LlamaForCausalLM
            self.kind, self.container, self.attr = "llama", model.model, "layers"
        elif hasattr(model, "layers") and hasattr(model, "embed_tokens"):  # LlamaModel
            self.kind, self.container, self.attr = "llama", model, "layers"
        else:
            raise ModelError(f"{type(model).__name__} is not a supported transformer layout",
                             "edgec slices BERT-family encoders and Llama-family decoders",
                             "use a BERT/MiniLM encoder or a Llama/SmolLM/Qwen2-style decoder")

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.container, self.attr)

    @property
    def group(self) -> int:
        """Query heads per KV head: heads are kept in multiples of this."""
        return self.num_heads // self.kv_heads

    def refs(self, i: int) -> LayerRefs:
        blk = self.layers[i]
        if self.kind == "bert":
            a = blk.attention
            return LayerRefs(a.self.query, a.self.key, a.self.value, a.output.dense, (blk.intermediate.dense,),
                             blk.output.dense, a.self, blk.intermediate)
        a, mlp = blk.self_attn, blk.mlp
        return LayerRefs(a.q_proj, a.k_proj, a.v_proj, a.o_proj, (mlp.gate_proj, mlp.up_proj), mlp.down_proj, a,
                         _Product(mlp))

    def embedding_name(self) -> str:
        """Module name of the token embedding table."""
        emb = self.model.get_input_embeddings()
        return next(n for n, m in self.model.named_modules() if m is emb)

    def linear_names(self, i: int) -> dict[str, list[str]]:
        """Module names of layer ``i``'s Linears, by group: ``{"attn": [...], "ffn": [...]}``."""
        names = {id(m): n for n, m in self.model.named_modules()}
        r = self.refs(i)
        return {"attn": [names[id(m)] for m in (r.q, r.k, r.v, r.o)],
                "ffn": [names[id(m)] for m in (*r.ffn_in, r.ffn_out)]}


class _Product:
    """Stands for a Llama MLP's channel activation ``act(gate(x)) * up(x)``: the input of down_proj."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp

    def register_forward_hook(self, fn):
        # the product is down_proj's input: rewrite it there
        def pre(mod, args):
            out = fn(self.mlp, args, args[0])
            return (out,) if out is not None else None
        return self.mlp.down_proj.register_forward_pre_hook(pre)


@dataclass(frozen=True)
class TransformerSubnet:
    """An elastic sub-network: the first ``layers`` layers, ``heads[i]`` heads and ``ffn[i]`` FFN
    channels in layer ``i`` (tuples of length ``layers``)."""

    layers: int
    heads: tuple[int, ...]
    ffn: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": list(self.heads), "ffn": list(self.ffn)}

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerSubnet":
        return cls(int(d["layers"]), tuple(int(h) for h in d["heads"]), tuple(int(f) for f in d["ffn"]))


@dataclass(frozen=True)
class ElasticSpace:
    """Choices per dim: ``layers`` (kept depths), ``heads`` (kept heads per layer, multiples of the GQA
    group), ``ffn`` (kept FFN channels per layer, multiples of 64 so matmuls stay SIMD-aligned; 8–32
    for toy models with fewer than 1024 channels)."""

    num_layers: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    ffn: tuple[int, ...]

    @classmethod
    def for_model(cls, model: nn.Module, min_depth_fraction: float = 0.5, ffn_fractions=(1.0, 0.75, 0.5, 0.25)):
        arch = Arch(model)
        n = len(arch.layers)
        g = arch.group
        heads = tuple(sorted({h for h in (arch.num_heads, round(arch.num_heads * 2 / 3 / g) * g,
                                            round(arch.num_heads / 2 / g) * g, round(arch.num_heads / 3 / g) * g)
                              if h >= g}, reverse=True))
        unit = max(8, min(64, arch.ffn // 16))  # 64 for real models (SIMD-friendly), smaller for toy ones
        ffn = tuple(sorted({max(unit, round(arch.ffn * f / unit) * unit) for f in ffn_fractions}, reverse=True))
        layers = tuple(range(n, max(1, int(round(n * min_depth_fraction))) - 1, -1))
        return cls(n, layers, heads, ffn)

    def full(self) -> TransformerSubnet:
        return TransformerSubnet(self.num_layers, (self.heads[0],) * self.num_layers, (self.ffn[0],) * self.num_layers)

    def smallest(self) -> TransformerSubnet:
        n = self.layers[-1]
        return TransformerSubnet(n, (self.heads[-1],) * n, (self.ffn[-1],) * n)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "layers": list(self.layers), "heads": list(self.heads),
                "ffn": list(self.ffn)}


def _token_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].unsqueeze(-1).to(torch.float32)


@torch.no_grad()
def collect_importance(model: nn.Module, batches: Iterable[dict]) -> dict[str, list[torch.Tensor]]:
    """Per-layer importance on calibration batches (tokenized dicts with ``attention_mask``):
    ``{"heads": [(num_heads,) float32 per layer], "ffn": [(ffn,) float32 per layer]}`` — the scores
    in the module docstring, averaged over real tokens. For GQA models a head's score is its KV
    group's total, so groups are ranked as wholes."""
    arch = Arch(model)
    n = len(arch.layers)
    dev = next(model.parameters()).device
    heads = [torch.zeros(arch.num_heads, device=dev) for _ in range(n)]
    ffn = [torch.zeros(arch.ffn, device=dev) for _ in range(n)]
    state = {"mask": None, "tokens": 0.0}
    hooks = []
    for i in range(n):
        r = arch.refs(i)

        def on_ffn(mod, inp, out, i=i, r=r):
            ffn[i] += (out.abs() * state["mask"]).sum((0, 1)).float() * r.ffn_out.weight.norm(dim=0).float()

        def on_ctx(mod, inp, out, i=i, r=r):
            ctx = out[0] if isinstance(out, tuple) else out
            b, t, _ = ctx.shape
            c = ctx.reshape(b, t, arch.num_heads, arch.head_dim)
            w = r.o.weight.reshape(r.o.weight.shape[0], arch.num_heads, arch.head_dim)
            contrib = torch.einsum("bthd,ohd->btho", c, w).norm(dim=-1)  # (B, T, heads)
            heads[i] += (contrib * state["mask"]).sum((0, 1)).float()
        hooks.append(r.ffn_act.register_forward_hook(on_ffn))
        hooks.append(_ctx_hook(arch, r, on_ctx))
    try:
        model.eval()
        for batch in batches:
            state["mask"] = _token_mask(batch)
            state["tokens"] += float(state["mask"].sum())
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    tokens = max(state["tokens"], 1.0)
    heads = [h / tokens for h in heads]
    if arch.group > 1:  # a KV group is kept or dropped whole: every head in it carries the group's score
        heads = [h.reshape(arch.kv_heads, arch.group).sum(1).repeat_interleave(arch.group) for h in heads]
    return {"heads": [h.cpu() for h in heads], "ffn": [f.cpu() / tokens for f in ffn]}


def _ctx_hook(arch: Arch, r: LayerRefs, fn):
    """A hook seeing (and able to replace) the heads' concatenated context, the input of ``o``."""
    def pre(mod, args):
        out = fn(mod, None, (args[0],))
        return (out[0],) if out is not None else None
    return r.o.register_forward_pre_hook(pre)


def _permute_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[idx].contiguous()
    if lin.bias is not None:
        lin.bias.data = lin.bias.data[idx].contiguous()


def _permute_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[:, idx].contiguous()


def _head_cols(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None]).reshape(-1)


@torch.no_grad()
def rewire(model: nn.Module, importance: dict) -> None:
    """Permute heads (whole KV groups in GQA models) and FFN channels of every layer into descending
    importance, in place. The model computes the same function (up to float rounding)."""
    arch = Arch(model)
    for i in range(len(arch.layers)):
        r = arch.refs(i)
        f = torch.argsort(importance["ffn"][i], descending=True, stable=True)
        for lin in r.ffn_in:
            _permute_rows(lin, f)
        _permute_cols(r.ffn_out, f)
        # order KV groups by score, and query heads inside the new group order
        g = arch.group
        group_score = importance["heads"][i].reshape(arch.kv_heads, g)[:, 0]
        kv_order = torch.argsort(group_score, descending=True, stable=True)
        q_order = (kv_order[:, None] * g + torch.arange(g)[None]).reshape(-1)
        _permute_rows(r.q, _head_cols(q_order, arch.head_dim))
        _permute_cols(r.o, _head_cols(q_order, arch.head_dim))
        kv_cols = _head_cols(kv_order, arch.head_dim)
        _permute_rows(r.k, kv_cols)
        _permute_rows(r.v, kv_cols)
        importance["ffn"][i] = importance["ffn"][i][f]
        importance["heads"][i] = importance["heads"][i][q_order]


@contextmanager
def elastic(model: nn.Module, subnet: TransformerSubnet):
    """Run ``model`` (rewired) as ``subnet`` inside the ``with``: dropped heads' context and dropped FFN
    channels are zeroed by hooks (exactly their removal), layers past ``subnet.layers`` are skipped."""
    arch = Arch(model)
    full = arch.layers
    hooks = []
    for i in range(subnet.layers):
        r = arch.refs(i)
        if subnet.ffn[i] < arch.ffn:
            w = r.ffn_out.weight
            fm = (torch.arange(arch.ffn, device=w.device) < subnet.ffn[i]).to(w.dtype)
            hooks.append(r.ffn_act.register_forward_hook(lambda mod, inp, out, fm=fm: out * fm))
        if subnet.heads[i] < arch.num_heads:
            w = r.o.weight
            hm = (torch.arange(arch.num_heads * arch.head_dim, device=w.device)
                  < subnet.heads[i] * arch.head_dim).to(w.dtype)
            hooks.append(_ctx_hook(arch, r, lambda mod, inp, out, hm=hm: (out[0] * hm,)))
    setattr(arch.container, arch.attr, nn.ModuleList(list(full)[:subnet.layers]))
    try:
        yield model
    finally:
        setattr(arch.container, arch.attr, full)
        for h in hooks:
            h.remove()


def _slice(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    out.weight.data = w.clone().contiguous()
    if lin.bias is not None:
        out.bias.data = (lin.bias.data[rows] if rows is not None else lin.bias.data).clone()
    return out


def _set(parent_of: dict, lin: nn.Linear, new: nn.Linear) -> None:
    parent, name = parent_of[id(lin)]
    setattr(parent, name, new)


@torch.no_grad()
def extract(model: nn.Module, subnet: TransformerSubnet) -> nn.Module:
    """A new model computing ``subnet`` of the rewired ``model`` with physically smaller weights
    (the model itself is left unchanged). ``config.num_hidden_layers`` is updated; per-layer head
    counts live on each attention module (``num_attention_heads`` / ``all_head_size`` for BERT,
    ``num_heads`` / ``num_key_value_heads`` for Llama, and the projections' shapes)."""
    out = copy.deepcopy(model)
    arch = Arch(out)
    setattr(arch.container, arch.attr, nn.ModuleList(list(arch.layers)[:subnet.layers]))
    out.config.num_hidden_layers = subnet.layers
    if hasattr(out.config, "layer_types") and out.config.layer_types:
        out.config.layer_types = out.config.layer_types[:subnet.layers]
    parent_of = {id(m): (p, n) for pn, p in out.named_modules() for n, m in p.named_children()}
    for i in range(subnet.layers):
        r = arch.refs(i)
        keep_f = torch.arange(subnet.ffn[i])
        for lin in r.ffn_in:
            _set(parent_of, lin, _slice(lin, rows=keep_f))
        _set(parent_of, r.ffn_out, _slice(r.ffn_out, cols=keep_f))
        h = subnet.heads[i]
        q_cols = torch.arange(h * arch.head_dim)
        kv = h // arch.group
        kv_cols = torch.arange(kv * arch.head_dim)
        _set(parent_of, r.q, _slice(r.q, rows=q_cols))
        _set(parent_of, r.k, _slice(r.k, rows=kv_cols))
        _set(parent_of, r.v, _slice(r.v, rows=kv_cols))
        _set(parent_of, r.o, _slice(r.o, cols=q_cols))
        if arch.kind == "bert":
            r.attn.num_attention_heads = h
            r.attn.all_head_size = h * arch.head_dim
        else:
            for name, value in (("num_heads", h), ("num_key_value_heads", kv)):
                if hasattr(r.attn, name):
                    setattr(r.attn, name, value)
            if hasattr(r.attn, "config"):  # HF Llama attention reads head counts from its config
                r.attn.config = copy.copy(r.attn.config)
                r.attn.config.num_attention_heads, r.attn.config.num_key_value_heads = h, kv
    return out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of
    the token states over real tokens, L2-normalized. (B, T, H) float, (B, T) int → (B, H) float32."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    v = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(v.float(), dim=-1)


def distill(model: nn.Module, teacher: nn.Module, batches: Callable[[], dict], steps: int, *, lr: float = 1e-4,
            seed: int = 0, on_step: Callable[[int, int, float], None] | None = None) -> dict:
    """Recovery of an extracted sub-network by distillation from the frozen FP32 ``teacher`` (DynaBERT's
    losses, Hou et al. 2020 §3.2, on one fixed sub-network): each of ``steps`` steps takes one
    calibration batch (``batches()`` returns a tokenized dict on the models' device) and minimizes the
    mean squared error of the last token states over real tokens (per hidden unit) + (1 − cosine) of
    the mean-pooled sentence embeddings. AdamW at ``lr``, dropout off. Trains ``model`` in place.
    Returns ``{"steps", "seconds", "final_loss", "lr", "device"}``.

    Measured on MiniLM (H200, batch 64, 1,600 steps, 1,493 calibration sentences): 25 % of the FFN
    channels removed in every layer went from mean cosine 0.888 to 0.986; with 4 of 12 heads removed
    too, 0.794 → 0.969. Training all sub-networks at once by the sandwich rule (BigNAS/DynaBERT) did
    worse on this little text: the full model fell to 0.95–0.98 and that sub-network reached only 0.92."""
    import time

    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    teacher.eval()
    model.eval()  # dropout off: the student matches the teacher's deterministic outputs (gradients still flow)
    t0 = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        batch = batches()
        with torch.no_grad():
            th = teacher(**batch).last_hidden_state
            te = mean_pool(th, batch["attention_mask"])
        m = _token_mask(batch)
        opt.zero_grad(set_to_none=True)
        sh = model(**batch).last_hidden_state
        mse = ((sh - th) ** 2 * m).sum() / (m.sum() * sh.shape[-1])
        cos = 1 - (mean_pool(sh, batch["attention_mask"]) * te).sum(-1).mean()
        loss = mse + cos
        loss.backward()
        opt.step()
        loss_value = loss.item()
        if on_step:
            on_step(step + 1, steps, loss_value)
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": loss_value, "lr": lr,
            "device": str(next(model.parameters()).device)}


class _Captured(Exception):
    """Stops a forward pass once the first block's inputs are captured."""


def _block_inputs(model: nn.Module, batches: Sequence[dict]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each batch: the embeddings' output and the masks
    (the forward pass stops there)."""
    seen: list[tuple[tuple, dict]] = []

    def stop(m, a, k):
        seen.append((a, k))
        raise _Captured
    h = Arch(model).layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**b)
            except _Captured:
                pass
    finally:
        h.remove()
    return seen


def _run_block(blk: nn.Module, call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """Run ``blk`` on one captured call; the same call with the block's output as hidden states."""
    args, kwargs = call
    out = blk(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    if args:
        return (out, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": out}


@torch.no_grad()
def reconstruct(model: nn.Module, teacher: nn.Module, batches: Sequence[dict], *, ridge: float = 1e-3) -> dict:
    """Layer-wise least-squares reconstruction of an extracted sub-network, in place (Kwon et al., "A Fast
    Post-Training Pruning Framework for Transformers", NeurIPS 2022, §4.3, which tunes per-head/neuron
    mask values by linear least squares; here the whole output projection is refit, as ZipLM's update
    does, Kurtić et al. NeurIPS 2023 §3).

    BERT-family (post-LayerNorm) blocks only: each sublayer computes ``LayerNorm(dense(x) + residual)``.
    Block by block, on the sub-network's own inputs (so earlier errors are compensated), the attention
    output ``dense`` and then the FFN output ``dense`` (weight and bias) are solved in closed form so
    that ``dense(x) + residual`` matches the FP32 ``teacher``'s pre-LayerNorm sum in the same block, over
    the real (unpadded) tokens of ``batches``: ridge regression with ``ridge`` × the mean diagonal of
    XᵀX. With fewer layers than the teacher, the last block's FFN is fit to the teacher's *last* block
    and takes that block's output LayerNorm. Heads' and channels' input projections are unchanged.

    ``batches``: tokenized dicts (``input_ids``, ``attention_mask``, … int64, (B, T)) on the models'
    device. Returns ``{"sublayers", "tokens", "ridge", "seconds"}``. Raises :class:`ModelError` for
    other layouts.

    Measured on MiniLM (FP32, 2 CPU threads, 1,408 calibration sentences, about 42k tokens; mean cosine
    on the 256 held-out calibration sentences): 25 % of the FFN channels removed in every layer,
    0.885 → 0.980 in 76 s (300 distillation steps on the CPU reached 0.972 in 11 minutes;
    512 sentences: 0.972); 4 of 12 heads removed, 0.885 → 0.947 (512 sentences); the last of 6
    layers dropped, 0.43 → 0.85. Ridge 1e-2 or 1e-4 instead of 1e-3 changed the result by < 0.002.
    """
    import time

    arch, tarch = Arch(model), Arch(teacher)
    if arch.kind != "bert" or tarch.kind != "bert":
        raise ModelError("least-squares reconstruction needs a BERT-family (post-LayerNorm) encoder",
                         f"got a {arch.kind} layout", "use distillation (--recovery-steps) for this model")
    t0 = time.perf_counter()
    model.eval()
    teacher.eval()
    masks = [b["attention_mask"].bool() for b in batches]
    calls, tcalls = _block_inputs(model, batches), _block_inputs(teacher, batches)
    n, nt = len(arch.layers), len(tarch.layers)

    def sub(blk, which):
        return blk.attention.output if which == "attn" else blk.output

    def teacher_sums(i: int) -> tuple[list, dict]:
        """The teacher's pre-LayerNorm sums of block ``i`` per batch (real tokens only; with fewer
        layers, the FFN sum of its last block for our last one) and its calls into block ``i + 1`` —
        one pass of each teacher block."""
        sums: dict = {"attn": [], "ffn": []}
        last = i == n - 1 and nt > n
        hooks = [sub(tarch.layers[i], "attn").LayerNorm.register_forward_pre_hook(
                     lambda m, a: sums["attn"].append(a[0][mask])),
                 sub(tarch.layers[nt - 1 if last else i], "ffn").LayerNorm.register_forward_pre_hook(
                     lambda m, a: sums["ffn"].append(a[0][mask]))]
        nxt = []
        try:
            for call, mask in zip(tcalls, masks):
                out = _run_block(tarch.layers[i], call)
                nxt.append(out)
                if last:
                    for tb in list(tarch.layers)[i + 1:]:
                        out = _run_block(tb, out)
        finally:
            for h in hooks:
                h.remove()
        return nxt, sums

    state: dict = {}
    for i, blk in enumerate(arch.layers):
        tcalls, sums = teacher_sums(i)
        for which in ("attn", "ffn"):
            mod = sub(blk, which)
            if which == "ffn" and i == n - 1 and nt > n:
                mod.LayerNorm.load_state_dict(sub(tarch.layers[nt - 1], "ffn").LayerNorm.state_dict())
            hooks = [mod.dense.register_forward_hook(lambda m, a, o: state.update(x=a[0], d=o)),
                     mod.LayerNorm.register_forward_pre_hook(lambda m, a: state.update(p=a[0]))]
            d = mod.dense.in_features
            xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64)
            xty = torch.zeros(d + 1, mod.dense.out_features, dtype=torch.float64)
            try:
                for call, m, target in zip(calls, masks, sums[which]):
                    blk(*call[0], **call[1])
                    x = state["x"][m]
                    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                    y = target - (state["p"][m] - state["d"][m])  # the teacher's sum minus our residual
                    xtx += (x.T @ x).double().cpu()
                    xty += (x.T @ y).double().cpu()
            finally:
                for h in hooks:
                    h.remove()
            reg = ridge * xtx.diagonal()[:-1].mean()
            w = torch.linalg.solve(xtx + reg * torch.eye(d + 1, dtype=xtx.dtype), xty)
            mod.dense.weight.copy_(w[:-1].T.to(mod.dense.weight.dtype))
            mod.dense.bias.copy_(w[-1].to(mod.dense.bias.dtype))
        calls = [_run_block(blk, c) for c in calls]
    return {"sublayers": 2 * n, "tokens": int(sum(int(m.sum()) for m in masks)), "ridge": ridge,
            "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class TransformerCandidate:
    """A sub-network and the precision of each kept layer's Linears by group: ``precision[i] =
    (attention Linears, FFN Linears)``, each one of :data:`PRECISIONS`. ``id``: a stable hash."""

    subnet: TransformerSubnet
    precision: tuple[tuple[str, str], ...]
    embedding: str = "fp32"  # the token embedding table: fp32 | int8 (a quarter of the bytes)

    @property
    def id(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return {"subnet": self.subnet.to_dict(), "precision": [list(p) for p in self.precision],
                "embedding": self.embedding}

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerCandidate":
        return cls(TransformerSubnet.from_dict(d["subnet"]), tuple((a, f) for a, f in d["precision"]),
                   d.get("embedding", "fp32"))

    def policy(self, arch: Arch) -> dict[str, str]:
        """{Linear module name: precision} for the extracted model (same module names as the full one)."""
        out = {arch.embedding_name(): self.embedding}
        for i, (pa, pf) in enumerate(self.precision):
            names = arch.linear_names(i)
            out.update({n: pa for n in names["attn"]})
            out.update({n: pf for n in names["ffn"]})
        return out

    def summary(self) -> str:
        s = self.subnet
        precs = sorted({p for pair in self.precision for p in pair})
        return (f"{s.layers} layers, heads {min(s.heads)}-{max(s.heads)}, FFN {min(s.ffn)}-{max(s.ffn)}, "
                f"{'/'.join(precs)}, embedding {self.embedding}")


class TransformerSearch:
    """NSGA-II (Optuna's ``NSGAIISampler``, seeded) over the elastic space × per-layer precision —
    SimQ-NAS's joint search (Sarah et al. 2023, §3) for transformers. One categorical per dim: depth,
    heads and FFN width of every layer, precision of every layer's attention and FFN Linears and of the
    embedding table (params
    of layers beyond the chosen depth are sampled but unused, so the space is fixed). Ask/tell;
    objectives (fidelity ↑, p50 latency ms ↓, size bytes ↓). ``initial`` candidates are asked first."""

    directions = ("maximize", "minimize", "minimize")

    def __init__(self, space: ElasticSpace, precisions: Sequence[str] = PRECISIONS, seed: int = 0,
                 population_size: int = 12, initial: Sequence[TransformerCandidate] = ()) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space, self.precisions = space, tuple(precisions)
        sampler = optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
        self.study = optuna.create_study(directions=list(self.directions), sampler=sampler)
        self._open: dict[str, list] = {}
        for c in initial:
            self.study.enqueue_trial(self._params(c))

    def _params(self, c: TransformerCandidate) -> dict:
        p = {"layers": c.subnet.layers, "q_embedding": c.embedding}
        for i in range(self.space.num_layers):
            j = min(i, c.subnet.layers - 1)  # unused layers repeat the last kept one's choices
            p[f"heads{i}"], p[f"ffn{i}"] = c.subnet.heads[j], c.subnet.ffn[j]
            p[f"q_attn{i}"], p[f"q_ffn{i}"] = c.precision[j]
        return p

    def ask(self) -> TransformerCandidate:
        t = self.study.ask()
        n = t.suggest_categorical("layers", self.space.layers)
        emb = t.suggest_categorical("q_embedding", ("fp32", "int8"))
        heads, ffn, prec = [], [], []
        for i in range(self.space.num_layers):
            h = t.suggest_categorical(f"heads{i}", self.space.heads)
            f = t.suggest_categorical(f"ffn{i}", self.space.ffn)
            pa = t.suggest_categorical(f"q_attn{i}", self.precisions)
            pf = t.suggest_categorical(f"q_ffn{i}", self.precisions)
            if i < n:
                heads.append(h)
                ffn.append(f)
                prec.append((pa, pf))
        c = TransformerCandidate(TransformerSubnet(n, tuple(heads), tuple(ffn)), tuple(prec), emb)
        self._open.setdefault(c.id, []).append(t)
        return c

    def tell(self, c: TransformerCandidate, values: Sequence[float] | None) -> None:
        import optuna

        t = self._open[c.id].pop(0)
        if values is None:
            self.study.tell(t, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(t, list(values))
