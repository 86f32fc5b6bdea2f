"""Causal-LM compile path: per-layer weight precision, the fused builder graph, ORT generation, the job's config."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.errors import ConfigError

pytest.importorskip("transformers")

CHARS = [chr(c) for c in range(32, 127)]
VOCAB = 3 + len(CHARS)


def tiny_llama_dir(path):
    """A random 2-layer LlamaForCausalLM (GQA: 4 heads, 2 KV heads, tied embeddings) with a character-level
    tokenizer (printable ASCII), saved as a Hugging Face directory."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, tiny_llama_dir(path)


def _bits(path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path))
    out = {}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            out[n.name] = next(a.i for a in n.attribute if a.name == "bits")
        elif n.op_type == "MatMul" and n.input[1] in {t.name for t in m.graph.initializer}:
            out[n.name] = 32
    return out


def test_build_decoder_applies_the_policy_and_matches_pytorch(tiny, tmp_path):
    from edgec.compile.decoder import build_decoder
    from edgec.decoder_job import check_parity

    hf_dir, model = tiny
    fp32 = build_decoder(hf_dir, tmp_path / "fp32", 2)
    assert all(b == 32 for b in _bits(fp32).values())
    window = np.arange(3, 35, dtype=np.int64)
    assert check_parity(fp32, model, window, atol=1e-3) < 1e-3
    q = build_decoder(hf_dir, tmp_path / "q", 2, [("int8w", "int4w"), ("fp32", "int8w")], "int4w")
    bits = {name.removesuffix("_Q4").removesuffix("_Q8").removesuffix("_Q4G32").removesuffix("_Q8G32"): b
            for name, b in _bits(q).items()}
    found = {k.rsplit("/MatMul", 1)[0] + "/MatMul": v for k, v in bits.items()}
    assert found["/model/layers.0/attn/qkv_proj/MatMul"] == 8 and found["/model/layers.0/attn/o_proj/MatMul"] == 8
    assert found["/model/layers.0/mlp/down_proj/MatMul"] == 4
    assert found["/model/layers.1/attn/qkv_proj/MatMul"] == 32  # fp32 stays a plain MatMul
    assert found["/model/layers.1/mlp/up_proj/MatMul"] == 8 and found["/lm_head/MatMul"] == 4
    assert (tmp_path / "q" / "genai_config.json").is_file()
    # quantized weights change the logits, but not beyond recognition
    diff = check_parity(q, model, window, atol=10.0)
    assert 1e-4 < diff < 10.0


def test_ort_decoder_generates_like_pytorch_and_scores_perplexity(tiny, tmp_path):
    import torch

    from edgec.compile.decoder import build_decoder, export_reference
    from edgec.targets.ort_generate import Decoder, perplexity, session

    hf_dir, model = tiny
    prompt = [1, 5, 9, 17, 33, 40, 41, 42]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, len(prompt):]
    windows = np.stack([np.arange(3, 35), np.arange(40, 72)]).astype(np.int64)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.from_numpy(windows)).logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, torch.from_numpy(windows[:, 1:, None])).mean()
    for path, shared in ((export_reference(model, tmp_path / "ref.onnx"), False),
                         (build_decoder(hf_dir, tmp_path / "fused", 2), True)):
        dec = Decoder(session(path))
        out = dec.generate(prompt, 8)
        assert out["tokens"] == want.tolist()
        assert dec.shared_cache is shared  # GroupQueryAttention decodes in place; optimum's Concat graph cannot
        assert out["ttft_s"] > 0 and out["decode_tokens_per_s"] > 0
        assert perplexity(dec, windows) == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_agreement_counts_the_common_prefix():
    from edgec.decoder_job import agreement

    a = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a["prefix"] == pytest.approx((2 / 4 + 1) / 2)
    assert a["token"] == pytest.approx((3 / 4 + 1) / 2)


def test_decoder_search_asks_the_seeds_first_and_policies_are_stable():
    from edgec.search.decoder_policy import DecoderCandidate, DecoderSearch, llama_cpp_mixed, uniform

    mixed = llama_cpp_mixed(30)
    more = [i for i, p in enumerate(mixed.precision) if p == ("int8w", "int8w")]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]  # i < n/8, i ≥ 7n/8, (i - 4) % 3 == 2
    seeds = [uniform(4, "int8w"), llama_cpp_mixed(4)]
    s = DecoderSearch(4, seed=0, population_size=4, initial=seeds)
    first = [s.ask(), s.ask()]
    assert first == seeds
    s.tell(first[0], (10.0, 5.0, 1e6))
    s.tell(first[1], None)
    later = s.ask()
    assert len(later.precision) == 4 and later.lm_head in ("int8w", "int4w")
    assert DecoderCandidate.from_dict(later.to_dict()) == later and later.id == DecoderCandidate.from_dict(
        later.to_dict()).id
    assert uniform(4, "int4w").counts() == {"int4w": 8}


def test_config_keeps_encoder_and_decoder_settings_apart(tmp_path):
    from edgec.cli import _relative
    from edgec.config import CompileConfig

    assert _relative("10%") == pytest.approx(0.10) and _relative("0.2") == pytest.approx(0.2)
    assert CompileConfig(model="smollm2", max_ppl_increase=0.05).is_decoder
    assert not CompileConfig(model="minilm").is_decoder
    with pytest.raises(ConfigError, match="max_ppl_increase"):
        CompileConfig(model="minilm", max_ppl_increase=0.05)
    with pytest.raises(ConfigError, match="max_fidelity_drop"):
        CompileConfig(model="smollm2", max_fidelity_drop=0.05)
    with pytest.raises(ConfigError, match="max_ppl_increase"):
        CompileConfig(model="smollm2", max_ppl_increase=-0.1)
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert CompileConfig(model=str(folder)).is_decoder


def test_cli_refuses_a_bad_percentage(capsys):
    from edgec.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compile", "--model", "smollm2", "--max-ppl-increase", "ten"])
    assert e.value.code == 2 and "not a number or percentage" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_a_causal_lm_folder_end_to_end(tiny, tmp_path, capsys):
    """`edgec compile --model <LlamaForCausalLM folder>`: search, finalists, published artifact that
    generates, manifest and report — on a tiny random model so it takes seconds, not the 20 minutes of SmolLM2."""
    import json

    from edgec.cli import main

    hf_dir, _ = tiny
    out = tmp_path / "run"
    code = main(["compile", "--model", str(hf_dir), "--budget-evals", "3", "--max-ppl-increase", "5%",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["job"] == "compile-text-generation" and report["evaluated"] == 3
    chosen = report["chosen"]
    assert chosen["ppl_eval"] <= report["reference"]["ppl_eval"] * 1.05
    assert report["reference"]["parity_max_abs_logit_diff"] < 1e-2 and report["fp32_fused"]["ppl_increase"] == \
        pytest.approx(0.0, abs=1e-3)
    assert 0 <= chosen["greedy_agreement"]["prefix"] <= 1 and chosen["timing"]["decode_tokens_per_s"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["chosen"])
    folder = out / art["path"].rsplit("/", 1)[0]
    assert {"model.onnx", "tokenizer.json", "genai_config.json"} <= {p.name for p in folder.iterdir()}
    assert (art["layers"], art["kv_heads"], art["head_dim"], art["eos_token_ids"]) == (2, 2, 16, [2])
    assert (out / "report.html").read_text().count("<tr>") >= 4 and (out / "candidates.csv").is_file()
    # the published artifact generates on its own (the documented example)
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    r = subprocess.run([sys.executable, str(example), str(folder), "--prompt", "def f(x):", "--raw",
                        "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr
    r = subprocess.run([sys.executable, str(example), str(folder), "--prompt", "", "--raw"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "prompt is empty" in r.stderr and "Traceback" not in r.stderr
    # resuming replays the stored evaluations instead of rebuilding them
    assert main(["compile", "--model", str(hf_dir), "--budget-evals", "3", "--max-ppl-increase", "5%",
                 "--out", str(out), "--resume"]) == 0


@pytest.mark.parametrize("cfg, message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel is not supported"),
    ({"model_type": "gpt2"}, "gpt2 is not supported"),  # no architectures: the model type decides
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 64},
     "context of 64 tokens is too short"),
])
def test_unsupported_causal_lms_are_refused_in_one_line_before_any_work(tmp_path, capsys, cfg, message):
    import json

    from edgec.cli import main

    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["compile", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_resume_replays_only_complete_records_whose_model_is_still_there(tmp_path):
    from edgec.decoder_job import _valid_record

    model = tmp_path / "model.onnx"
    model.write_bytes(b"x")
    rec = {"ppl_search": 12.0, "timing": {}, "size_bytes": 1, "path": str(model), "candidate": {}}
    _valid_record(rec)
    _valid_record({"error": "build failed"})  # failures replay as failures
    with pytest.raises(ValueError, match="timing"):
        _valid_record({k: v for k, v in rec.items() if k != "timing"})
    model.unlink()
    with pytest.raises(ValueError, match="moved"):
        _valid_record(rec)
