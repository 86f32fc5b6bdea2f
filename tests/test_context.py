"""The context compressor: memory layout, projector, checkpoints, export parity and the CLI — on a tiny
random Llama so it takes seconds (the SmolLM2 numbers come from `edgec context eval`, see README)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgec.errors import ConfigError, ModelError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    lm = LlamaForCausalLM(cfg).eval()
    lm.config._attn_implementation = "eager"
    return lm


def _spec(**kw):
    from edgec.compile.context import CompressorSpec

    return CompressorSpec(**{"encoder_layers": 2, "group_tokens": 4, "window_tokens": 16, "projector_hidden": 8,
                             "hidden_size": 32, "decoder": "tiny", **kw})


def test_windows_drop_the_oldest_remainder_and_pad_the_last_window(tiny_lm):
    from edgec.compile.context import Compressor

    comp = Compressor(tiny_lm, _spec())
    win, m = comp.windows(np.arange(1, 23), pad_id=0)  # 22 tokens: 2 dropped, 20 kept → 5 memory rows
    assert m == 5
    assert win.shape == (2, 16)
    assert win[0, 0] == 3 and win[1, 3] == 22 and (win[1, 4:] == 0).all()


def test_right_padding_does_not_change_the_memory_of_real_tokens(tiny_lm):
    """The encoder is causal, so the padded last window gives the same memory as the real tokens alone."""
    import torch

    from edgec.compile.context import Compressor

    comp = Compressor(tiny_lm, _spec())
    ids = np.random.default_rng(0).integers(3, 40, 24)
    with torch.no_grad():
        padded = comp.memory(ids, pad_id=0)  # 24 tokens → windows of 16 + 8 (+8 padding)
        other_pad = comp.memory(ids, pad_id=7)
        exact_second = comp.encode_windows(torch.from_numpy(ids[16:24].reshape(1, 8)))
    assert padded.shape == (6, 32)
    torch.testing.assert_close(padded, other_pad)
    torch.testing.assert_close(padded[4:], exact_second[0], rtol=1e-5, atol=1e-5)


def test_the_untrained_projector_emits_the_embedding_scaled_group_mean(tiny_lm):
    import torch

    from edgec.compile.context import Compressor

    comp = Compressor(tiny_lm, _spec(encoder_layers=0))
    ids = np.arange(3, 19)
    with torch.no_grad():
        mem = comp.memory(ids)
        e = tiny_lm.model.embed_tokens(torch.from_numpy(ids))
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)
        rms = tiny_lm.model.embed_tokens.weight.pow(2).mean().sqrt()
    torch.testing.assert_close(mem, e.reshape(4, 4, 32).mean(1) * rms, rtol=1e-4, atol=1e-5)


def test_the_decoder_only_gets_gradients_into_the_projector(tiny_lm):
    import torch

    from edgec.compile.context import Compressor

    comp = Compressor(tiny_lm, _spec())
    mem = comp.memory(np.arange(3, 35))[None]
    loss = comp.target_nll(mem, torch.arange(3, 11)[None])
    loss.backward()
    assert all(p.grad is None for p in tiny_lm.parameters())
    assert comp.projector.up.weight.grad is not None and comp.projector.linear.weight.grad.abs().sum() > 0


def test_kv_memory_made_of_the_true_states_is_the_decoders_own_cache(tiny_lm):
    """If the KV memory held, per layer, the decoder's own hidden states of M tokens, its cache must be the
    decoder's cache of those tokens (norms, k/v projections, RoPE at positions 1..M) and the logits after
    it those of the decoder reading the tokens as text (bridge = the next token's embedding)."""
    import torch

    from edgec.compile.context import Compressor

    comp = Compressor(tiny_lm, _spec(memory="kv"))
    ids = torch.tensor([[1, 5, 9, 2, 7, 11, 3, 8, 4, 6, 10, 12]])  # doc_start 1, 7 memory tokens, then 4
    m = 7
    with torch.no_grad():
        out = tiny_lm(ids, output_hidden_states=True, use_cache=True)
        states = torch.stack(out.hidden_states[:3], 2)[:, 1:1 + m]  # (1, M, layers, hidden): each layer's input
        keys, values = comp.memory_kv(states, doc_start=1)
        pkv = out.past_key_values
        for i in range(3):
            torch.testing.assert_close(keys[i], pkv.layers[i].keys[:, :, :1 + m], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values[i], pkv.layers[i].values[:, :, :1 + m], rtol=1e-4, atol=1e-5)
        comp.projector.bridge.copy_(tiny_lm.model.embed_tokens.weight[ids[0, 1 + m]])
        logits = comp.cached_logits(keys, values, ids[:, 2 + m:])
    torch.testing.assert_close(logits, out.logits[:, 1 + m:-1], rtol=1e-4, atol=1e-4)
    assert keys.shape == (3, 1, 2, 1 + m, 8)


def test_kv_memory_refuses_decoders_whose_attention_is_not_llamas(tiny_lm):
    import copy

    from edgec.compile.context import Compressor

    other = copy.deepcopy(tiny_lm)
    other.config.model_type = "qwen3"  # q/k norms inside attention: the KV memory would skip them
    with pytest.raises(ModelError, match="needs a plain Llama decoder.*--memory embeddings"):
        Compressor(other, _spec(memory="kv"))
    assert Compressor(other, _spec()).spec.memory == "embeddings"


def test_the_kv_projector_trains_alone_and_starts_at_the_scaled_group_mean(tiny_lm):
    import torch

    from edgec.compile.context import Compressor, hidden_rms

    comp = Compressor(tiny_lm, _spec(memory="kv", encoder_layers=0))
    ids = np.arange(3, 19)
    rms = hidden_rms(tiny_lm, np.arange(256) * 7919 % 40)
    with torch.no_grad():
        mem = comp.memory(ids)  # (4 groups, 3 layers, 32)
        e = tiny_lm.model.embed_tokens(torch.from_numpy(ids))
        e = (e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(4, 4, 32).mean(1)
    assert mem.shape == (4, 3, 32) and len(rms) == 3
    for layer in range(3):
        torch.testing.assert_close(mem[:, layer], e * rms[layer], rtol=1e-4, atol=1e-5)
    loss = comp.memory_nll(comp.memory(np.arange(3, 35))[None], torch.arange(3, 11)[None], doc_start=1)
    loss.backward()
    assert all(p.grad is None for p in tiny_lm.parameters())
    assert comp.projector.bridge.grad.abs().sum() > 0 and comp.projector.gain.grad.abs().sum() > 0


def test_spec_checks_and_weights_of_another_memory_count_are_refused(tiny_lm):
    from edgec.compile.context import Compressor, CompressorSpec, load_projector, trainable_state

    with pytest.raises(ConfigError, match="multiple of group_tokens"):
        _spec(window_tokens=18).check()
    with pytest.raises(ConfigError, match="--encoder-layers 5"):
        Compressor(tiny_lm, _spec(encoder_layers=5))
    with pytest.raises(ModelError, match="unknown keys"):
        CompressorSpec.from_dict({**_spec().to_dict(), "memory_slots": 3})
    with pytest.raises(ModelError, match="memory must be strings"):
        CompressorSpec.from_dict({**_spec().to_dict(), "memory": 3})
    with pytest.raises(ModelError, match="spec is damaged"):
        CompressorSpec.from_dict({**_spec().to_dict(), "memory": "hybrid"})
    assert CompressorSpec.from_dict(_spec().to_dict()) == _spec()
    older = {k: v for k, v in _spec(memory="kv").to_dict().items() if k != "memory"}  # before the KV memory
    assert CompressorSpec.from_dict(older).memory == "embeddings"
    trained = trainable_state(Compressor(tiny_lm, _spec(group_tokens=4)).projector)
    with pytest.raises(ModelError, match="do not match its spec"):
        load_projector(_spec(group_tokens=8), trained)


def test_training_autocasts_to_bfloat16_only_where_onednn_supports_it(monkeypatch):
    import torch

    from edgec.context_job import train_dtype

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert train_dtype() == expected

    def broken():
        raise RuntimeError("no such probe")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert train_dtype() == "float32"


def test_batches_are_a_function_of_seed_and_step():
    from edgec.context_job import Corpus, TrainSettings, batch_for

    rng = np.random.default_rng(1)
    corpus = Corpus([rng.integers(0, 50, n) for n in (300, 2000, 5000)], [], {})
    s = TrainSettings(restore_steps=2, continue_steps=3, batch_size=3)
    st, c, t = batch_for(1, s, corpus, 256)
    assert st == "restoration" and c.shape == (3, 256) and (c == t).all()
    st2, c2, t2 = batch_for(4, s, corpus, 256)
    assert st2 == "continuation" and c2.shape[1] in (256, 512, 768, 1024) and t2.shape == (3, 128)
    for a, b in zip(batch_for(4, s, corpus, 256)[1:], (c2, t2)):
        assert (a == b).all()
    assert not (batch_for(4, TrainSettings(restore_steps=2, continue_steps=3, batch_size=3, seed=1), corpus, 256)[2]
                == t2).all()
    with_contrast = TrainSettings(restore_steps=2, continue_steps=3, contrast_steps=2, batch_size=3)
    assert [batch_for(k, with_contrast, corpus, 256)[0] for k in range(7)] == \
        ["restoration"] * 2 + ["continuation"] * 3 + ["contrast"] * 2
    for a, b in zip(batch_for(4, with_contrast, corpus, 256)[1:], (c2, t2)):  # the stage does not move the batches
        assert (a == b).all()


@pytest.mark.parametrize("kw, message", [
    ({"restore_steps": 0, "continue_steps": 0}, "nothing to train"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"lr": float("nan")}, "--lr nan"),
    ({"seed": -1}, "--seed -1"),
    ({"group_tokens": 7}, "--group-tokens 7 does not divide"),
    ({"distill": -1.0}, "--distill -1.0"),
    ({"contrast": float("inf")}, "--contrast inf"),
    ({"contrast_steps": -1}, "--contrast-steps -1"),
    ({"tail_tokens": 5000}, "--tail-tokens 5000"),
    ({"contrast_steps": 5, "batch_size": 1}, "needs --batch-size 2"),
])
def test_train_settings_are_checked(kw, message):
    from edgec.context_job import TrainSettings

    with pytest.raises(ConfigError, match=message):
        TrainSettings(**kw).check()


def test_break_even_interpolates_where_compression_starts_to_pay():
    from edgec.context_job import break_even

    rows = [{"context_tokens": 64, "ttft_speedup": 0.5}, {"context_tokens": 128, "ttft_speedup": 1.5},
            {"context_tokens": 256, "ttft_speedup": 3.0}]
    assert break_even(rows) == 96.0
    assert break_even(rows[1:]) == 128.0
    assert break_even(rows[:1]) is None


def test_the_memory_is_placed_on_the_truncation_curve():
    from edgec.context_job import text_budgets, text_equivalent_tokens

    assert text_budgets(64, 512) == [0, 8, 16, 32, 64, 128, 512]
    assert text_budgets(4, 16) == [0, 1, 2, 4, 8, 16]
    curve = [{"text_tokens": k, "perplexity": p} for k, p in ((0, 21.0), (8, 17.0), (16, 15.0), (32, 13.0))]
    assert text_equivalent_tokens(curve, 16.0) == 12.0  # halfway between 8 and 16
    assert text_equivalent_tokens(curve, 15.0) == 16.0
    assert text_equivalent_tokens(curve, 25.0) == 0.0  # worse than no context
    assert text_equivalent_tokens(curve, 12.0) is None  # better than every budget measured
    bumpy = [{"text_tokens": 0, "perplexity": 10.0}, {"text_tokens": 4, "perplexity": 8.0},
             {"text_tokens": 8, "perplexity": 9.0}, {"text_tokens": 16, "perplexity": 6.0}]
    assert text_equivalent_tokens(bumpy, 8.5) == 3.0  # the first crossing, not 8 → 16


def test_perplexities_measure_the_truncation_curve_with_its_known_endpoints(tiny_lm):
    import math

    import torch

    from edgec.compile.context import Compressor
    from edgec.context_job import perplexities

    comp = Compressor(tiny_lm, _spec())  # group 4: a 32-token context gives 8 memory embeddings
    rng = np.random.default_rng(1)
    samples = [(i % 2, rng.integers(3, 40, 40)) for i in range(3)]
    r = perplexities(comp, 1, samples, 32, batch_size=2)
    curve = {c["text_tokens"]: c["perplexity"] for c in r["text_budget"]}
    assert list(curve) == [0, 1, 2, 4, 8, 16, 32] and r["memory_tokens"] == 8
    assert (curve[0], curve[8], curve[32]) == (r["a_no_context"], r["d_last_tokens"], r["b_full_context"])
    with torch.no_grad():  # the last 2 tokens as text, by hand
        start = comp.token_embeds(torch.tensor([[1]]))
        nll = sum(float(comp.target_nll(torch.cat([start, comp.token_embeds(torch.from_numpy(s[30:32])[None])], 1),
                                        torch.from_numpy(s[32:])[None])) for _, s in samples)
    assert curve[2] == pytest.approx(math.exp(nll / 24), rel=1e-3)
    with torch.no_grad():  # (f)'s text reference: the next sample of another document, whole context as text
        other = {0: 1, 1: 2, 2: 1}
        nll = sum(float(comp.target_nll(torch.cat([start, comp.token_embeds(torch.from_numpy(
            samples[other[i]][1][:32])[None])], 1), torch.from_numpy(s[32:])[None])) for i, (_, s) in enumerate(samples))
    assert r["f_other_document_text"] == pytest.approx(math.exp(nll / 24), rel=1e-3)
    eq = r["memory_text_equivalent_tokens"]
    assert eq is None or 0 <= eq <= 32
    assert r["tail_tokens"] == 0 and r["c_compressed"] == r["c_memory_only"]

    # with a tail: the memory of the 6 × 4 tokens before the last 2, then those 2 as text — by hand
    t = perplexities(comp, 1, samples, 32, tail_tokens=2, batch_size=2)
    assert (t["tail_tokens"], t["memory_tokens"], t["c_memory_only"]) == (2, 8, r["c_memory_only"])
    # another document's memory alone is (f) read without a tail; with no tail the two are one condition
    assert t["f_other_document_memory_only"] == r["f_other_document"] == r["f_other_document_memory_only"]
    assert t["f_other_document"] != t["f_other_document_memory_only"]
    assert t["e_tail_only"] == curve[2]
    with torch.no_grad():
        nll = 0.0
        for _, s in samples:
            mem = comp.memory(s[6:30], 1)[None]
            ids = torch.from_numpy(s[30:])[None]
            nll += float(comp.summed_nll(comp.memory_logits(mem, ids, 1)[:, 2:], ids[:, 2:]))
    assert t["c_compressed"] == pytest.approx(math.exp(nll / 24), rel=1e-3)


def test_split_context_keeps_the_budget_of_one_position_per_group():
    from edgec.targets.ort_context import split_context

    ids = np.arange(1000, 1000 + 515)  # 3 beyond a multiple of 8: N = 64
    older, tail = split_context(ids, 8, 32)
    assert tail.tolist() == ids[-32:].tolist() and older.tolist() == ids[-32 - 256:-32].tolist()
    assert len(older) // 8 + len(tail) == len(ids) // 8
    older, tail = split_context(ids[:40], 8, 32)  # N = 5: at most half the positions as text
    assert (len(older), tail.tolist()) == (24, ids[38:40].tolist())
    older, tail = split_context(ids[:100], 8, 0)  # no tail: the whole context less its oldest 100 % 8
    assert len(tail) == 0 and older.tolist() == ids[4:100].tolist()
    assert [len(a) for a in split_context(ids[:7], 8, 32)] == [0, 0]
    for bad in [(ids, 8, -5), (ids, 0, 32), (ids, 8, "32"), (ids, 8, True), (ids.reshape(5, 103), 8, 32),
                (ids * 1.5, 8, 32), (None, 8, 32)]:
        with pytest.raises(ConfigError):
            split_context(*bad)


def test_eval_without_a_trained_compressor_says_how_to_train(tmp_path, capsys):
    from edgec.cli import main

    assert main(["context", "eval", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no trained compressor" in err and "edgec context train" in err and len(err.strip().splitlines()) == 1


def _tiny_decoder_dir(tmp_path):
    """A tiny random Llama as a Hugging Face folder with a 4096-token context: (folder, its config)."""
    from test_decoder import tiny_llama_dir

    hf = tmp_path / "tiny"
    tiny_llama_dir(hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf, cfg


def test_train_stopped_before_its_first_checkpoint_never_deletes_another_runs_files(tmp_path):
    """A run stopped before its first checkpoint removes the folder it created only while it is empty: a
    second run started in the same folder meanwhile keeps what it wrote."""
    from edgec.context_job import TrainSettings, train

    hf, _ = _tiny_decoder_dir(tmp_path)
    base = dict(decoder=str(hf), restore_steps=2, continue_steps=0, batch_size=1, checkpoint_every=2,
                encoder_layers=1)

    class Stop:
        def __init__(self, out, intruder):
            self.out, self.intruder = out, intruder

        def stage(self, *a, **k): ...
        def log(self, *a): ...

        def advance(self, done, total=None, note=""):
            if self.intruder:  # another run's file lands in the folder during step 1
                (self.out / "other-run.json").write_text("{}")
            raise KeyboardInterrupt

    alone, shared = tmp_path / "alone", tmp_path / "shared"
    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(out=str(alone), **base), Stop(alone, False))
    assert not alone.exists()
    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(out=str(shared), **base), Stop(shared, True))
    assert (shared / "other-run.json").read_text() == "{}"


@pytest.mark.slow
def test_the_contrast_stage_extends_a_trained_compressor_and_scores_the_tail_reading(tmp_path):
    """``--contrast-steps`` on a folder trained without it adds the stage from its weights (the first stages
    are not run again); each contrast step records the CE after the own memory + tail, after another
    passage's memory + the same tail and after the tail alone, and its loss is CE + the hinge between the
    last two. Another run's options, or a second extension, are refused; runs without the stage keep the
    identity they had before it existed."""
    import torch
    from safetensors.torch import load_file

    from edgec.context_job import TrainSettings, load_compressor, train

    hf, _ = _tiny_decoder_dir(tmp_path)

    class Quiet:
        def stage(self, *a, **k): ...
        def advance(self, *a, **k): ...
        def log(self, *a): ...

    base = dict(out=str(tmp_path / "c"), decoder=str(hf), restore_steps=1, continue_steps=1, batch_size=2,
                encoder_layers=1, target_tokens=16)
    assert "contrast_steps" not in TrainSettings(**base).identity()  # checkpoints from before the stage resume
    meta = train(TrainSettings(**base), Quiet())
    before = load_file(str(tmp_path / "c" / "compressor.safetensors"))
    with pytest.raises(ConfigError, match="already holds"):  # another run's options: not an extension
        train(TrainSettings(**{**base, "seed": 1, "contrast_steps": 2}), Quiet())
    import shutil

    from safetensors.torch import save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "c", damaged)
    save_file({"down.weight": torch.zeros(1)}, str(damaged / "compressor.safetensors"))
    with pytest.raises(ModelError, match="cannot read the compressor"):  # not a traceback from torch
        train(TrainSettings(**{**base, "out": str(damaged), "contrast_steps": 2}), Quiet())
    ext = train(TrainSettings(**{**base, "contrast_steps": 2, "tail_tokens": 8}), Quiet())
    h = ext["training"]["history"]
    assert h[:2] == meta["training"]["history"] and [x["stage"] for x in h[2:]] == ["contrast", "contrast"]
    for x in h[2:]:
        # the hinge is taken per passage, then averaged: at least the hinge of the batch means
        assert x["loss"] == pytest.approx(x["ce"] + x["hinge"], abs=2e-4)
        assert x["hinge"] >= max(0.0, x["ce_tail"] - x["ce_other"]) - 2e-4
    assert ext["training"]["contrast_steps"] == 2 and ext["training"]["steps"] == 4
    assert set(ext["training"]["contrast_last_25"]) == {"ce", "ce_other", "ce_tail", "hinge"}
    after = load_file(str(tmp_path / "c" / "compressor.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="already holds"):  # it has its contrast stage now
        train(TrainSettings(**{**base, "contrast_steps": 2, "tail_tokens": 8}), Quiet())
    comp, _, _ = load_compressor(tmp_path / "c")  # and it loads as any compressor
    assert comp.spec.memory == "kv"


@pytest.mark.slow
def test_train_resume_export_and_eval_end_to_end(tmp_path, capsys):
    """Train a few steps on a tiny random Llama, interrupt-and-resume gives the same weights as one run,
    the export matches PyTorch and runs through the app's chain, eval writes its figures."""
    pytest.importorskip("onnxruntime_genai")
    import math

    import torch
    from safetensors.torch import load_file

    from edgec.cli import main
    from edgec.context_job import TrainSettings, train
    from edgec.targets.ort_context import ContextRuntime

    hf, cfg = _tiny_decoder_dir(tmp_path)

    class Quiet:
        def stage(self, *a, **k): ...
        def advance(self, *a, **k): ...
        def log(self, *a): ...

    base = dict(decoder=str(hf), restore_steps=2, continue_steps=2, batch_size=2, checkpoint_every=1,
                encoder_layers=1)
    one, two = tmp_path / "one", tmp_path / "two"
    meta = train(TrainSettings(out=str(one), **base), Quiet())
    assert meta["training"]["steps"] == 4 and not (one / "checkpoint.json").exists()
    assert meta["training"]["autocast"] in ("bfloat16", "float32")

    class Stop(Quiet):
        def advance(self, done, total=None, note=""):
            if done == 4:  # after step 3's checkpoint, during step 4
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainSettings(out=str(two), **base), Stop())
    assert json.loads((two / "checkpoint.json").read_text())["step"] == 3
    with pytest.raises(ConfigError, match="another training run.*seed"):
        train(TrainSettings(out=str(two), **{**base, "seed": 1}), Quiet())
    good = (two / "checkpoint.json").read_text()
    older = json.loads(good)
    del older["identity"]["memory"]  # a checkpoint from before --memory: input embeddings, not this kv run
    (two / "checkpoint.json").write_text(json.dumps(older))
    with pytest.raises(ConfigError, match="options differ: memory"):
        train(TrainSettings(out=str(two), **base), Quiet())
    (two / "checkpoint.json").write_text(good.replace('"step": 3', '"step": 2'))  # not the tensors' step
    with pytest.raises(ModelError, match="damaged"):
        train(TrainSettings(out=str(two), **base), Quiet())
    (two / "checkpoint.json").write_text(good)
    train(TrainSettings(out=str(two), **base), Quiet())  # resumes at step 3
    w1, w2 = (load_file(str(d / "compressor.safetensors")) for d in (one, two))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k])
    assert w1["down.weight"].abs().sum() > 0  # zero-initialized: training moved it
    with pytest.raises(ConfigError, match="already holds"):
        train(TrainSettings(out=str(one), **base), Quiet())

    assert main(["context", "export", str(one), "--variants", "fp32,int8w"]) == 0
    manifest = json.loads((one / "onnx" / "manifest.json").read_text())
    assert manifest["parity_fp32"]["memory_max_abs_diff"] < 1e-3 and manifest["memory_per_window"] == 32
    # the default KV memory: the encoder emits the decoder's cache; its graph holds only the layers' input
    # norms and k/v projections besides the encoder block (no traced decoder forward for doc_start)
    assert manifest["compressor"]["memory"] == "kv" and manifest["bridge_token_id"] == cfg["vocab_size"]
    import onnx

    enc = onnx.load(str(one / "onnx" / "encoder.onnx"))
    assert [o.name for o in enc.graph.output] == ["memory_keys", "memory_values"]
    matmuls = sum(n.op_type == "MatMul" for n in enc.graph.node)
    # block 0 (7 projections + 2 attention products), projector (2), k/v per layer, RoPE (2): measured 17
    assert matmuls <= 9 + 2 + 2 * cfg["num_hidden_layers"] + 2, matmuls
    assert set(manifest["encoders"]) == {"fp32", "int8"} and manifest["encoders"]["int8"]["memory_cosine_to_fp32"] > 0.9
    assert ContextRuntime(one / "onnx").encoder_variant == "int8"
    for bad in ("int4", ""):
        with pytest.raises(ModelError, match=f"no encoder variant '{bad}'"):
            ContextRuntime(one / "onnx", encoder=bad)
    old_style = {k: v for k, v in manifest.items() if k != "encoders"}  # an export from before the INT8 encoder
    (one / "onnx" / "manifest.json").write_text(json.dumps(old_style))
    assert ContextRuntime(one / "onnx").encoder_variant == "fp32"
    no_legacy = {k: v for k, v in manifest.items() if k != "encoder"}
    (one / "onnx" / "manifest.json").write_text(json.dumps(no_legacy))
    assert ContextRuntime(one / "onnx").encoder_variant == "int8"
    swapped = dict(manifest, encoders={"fp32": {"path": "embed.onnx"}})  # a graph of another signature
    (one / "onnx" / "manifest.json").write_text(json.dumps(swapped))
    with pytest.raises(ModelError, match="encoder graph embed.onnx does not match"):
        ContextRuntime(one / "onnx")
    (one / "onnx" / "manifest.json").write_text(json.dumps(manifest))
    embed = (one / "onnx" / "embed.onnx").read_bytes()  # a graph changed after the export: refused before loading
    (one / "onnx" / "embed.onnx").write_bytes(embed + b"\0")
    with pytest.raises(ModelError, match="embed graph embed.onnx is not the one exported"):
        ContextRuntime(one / "onnx")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load embed.onnx"):  # unverified: ORT finds it later
        ContextRuntime(one / "onnx", verify=False)
    (one / "onnx" / "embed.onnx").write_bytes(embed)
    rt = ContextRuntime(one / "onnx", encoder="fp32")
    ids = np.arange(3, 3 + 300) % 90 + 3
    out = rt.generate(ids[:296], ids[296:], 4)
    assert len(out["tokens"]) == 4
    real_inputs = rt.inputs

    def slow_inputs(*a, **k):  # ttft_s counts from the token ids: the encoder's time is in it
        import time
        time.sleep(0.3)
        return real_inputs(*a, **k)

    rt.inputs = slow_inputs
    assert rt.generate(ids[:296], ids[296:], 1)["ttft_s"] >= 0.3
    rt.inputs = real_inputs
    # past the decoder's 4096 positions: one clear error as text, while the compressed reading still fits
    assert rt.max_positions == 4096
    long_ids = np.arange(4200) % 90 + 3
    with pytest.raises(ConfigError, match="need 4204 decoder positions.*has 4096.*read the context compressed"):
        rt.generate(long_ids, [5, 6, 7], 2, compressed=False)
    assert len(rt.generate(long_ids, [5, 6, 7], 2)["tokens"]) == 2
    with pytest.raises(ConfigError, match="compressed context, prompt and new tokens need"):
        rt.generate(long_ids, [5, 6, 7], 4000)
    # a manifest whose memory count disagrees with the encoder graph is refused
    bad = dict(manifest, memory_per_window=16)
    (one / "onnx" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="memory"):
        ContextRuntime(one / "onnx")
    # KV exports, from a bad-input review: each a ModelError at load, not an ONNX Runtime error at the first call
    io = manifest["decoder_io"]
    for bad, message in [
            (dict(bad, compressor={**manifest["compressor"], "group_tokens": 16}), "one window gives 32 memory positions"),
            (dict(manifest, bridge_token_id=manifest["bridge_token_id"] - 1), "bridge_token_id .* last row"),
            (dict(manifest, bridge_token_id=True), "damaged"),
            *((dict(manifest, tail_tokens=t), "tail_tokens is") for t in (-5, 1.5, True, "32", None, 10 ** 30)),
            (dict(manifest, decoder_io={k: v for k, v in io.items() if k != "layers"}), "damaged"),
            (dict(manifest, decoder_io=dict(io, kv_heads=io["kv_heads"] * 2)), "encoder graph .* does not match")]:
        (one / "onnx" / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            ContextRuntime(one / "onnx")
    (one / "onnx" / "manifest.json").write_text(json.dumps(manifest))
    for ctx, prompt, message in [(ids[:16], [[5, 6]], "prompt is not a flat list"),
                                 (ids[:16], [cfg["vocab_size"]], "outside the vocabulary"),  # the bridge's row
                                 ([-1, 4], [5], "context holds token ids outside")]:
        with pytest.raises(ConfigError, match=message):
            rt.generate(ctx, prompt, 2)

    figures = tmp_path / "figures.json"
    (one / "onnx" / "encoder-int8.onnx").unlink()  # a damaged export is made again, not failed on late
    assert main(["context", "eval", str(one), "--samples", "4", "--context-tokens", "256",
                 "--json", str(figures)]) == 0
    assert (one / "onnx" / "encoder-int8.onnx").is_file()
    r = json.loads(figures.read_text())
    assert set(r["conditions"]) <= set(r["perplexity"]) and r["compression_ratio"] == 8
    assert [c["text_tokens"] for c in r["perplexity"]["text_budget"]] == [0, 4, 8, 16, 32, 64, 256]
    assert r["encoder"] == "int8" and math.isfinite(r["c_compressed_onnx_encoder"])
    assert r["c_compressed_onnx_encoder"] == pytest.approx(r["perplexity"]["c_compressed"], rel=0.2)
    assert "(16 KV-cache memory positions + the last 16 tokens as text) is worth" in capsys.readouterr().out
    # 256 tokens → N = 32 positions, of which the last 16 tokens as text (the default 32, capped at N // 2)
    assert r["perplexity"]["tail_tokens"] == r["tail_tokens"] // 2 == 16 and r["perplexity"]["memory_tokens"] == 32
    assert {row["memory_tokens"] + row["tail_tokens"] for row in r["ttft"]} >= {32, 128}
    assert json.loads((one / "onnx" / "manifest.json").read_text())["tail_tokens"] == 32
    assert r["ttft_speedup_1024"] > 0 and all(row["kind"] == "measured" for row in r["ttft"])
    assert (one / "report.html").read_text().count("data:image/png") == 2
    w = load_file(str(one / "compressor.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    # retrained: eval sees that the export belongs to the old weights and exports again
    from edgec.compile.package import sha256_file

    train(TrainSettings(out=str(one), **{**base, "seed": 3, "force": True}), Quiet())
    with pytest.raises(ModelError, match="other weights.*export it again"):  # the app would run stale graphs
        ContextRuntime(one)
    assert main(["context", "eval", str(one), "--samples", "2", "--context-tokens", "256", "--tail-tokens", "0",
                 "--json", str(figures)]) == 0
    r = json.loads(figures.read_text())["perplexity"]  # no tail: (c) is the memory of the whole context
    assert r["tail_tokens"] == 0 and r["c_compressed"] == r["c_memory_only"] and r["e_tail_only"] == r["a_no_context"]
    again = json.loads((one / "onnx" / "manifest.json").read_text())
    assert again["tail_tokens"] == 0
    assert again["compressor_sha256"] == sha256_file(one / "compressor.safetensors") != manifest["compressor_sha256"]
    assert set(again["decoders"]) == {"fp32", "int8w"}


@pytest.mark.slow
def test_embeddings_memory_trains_exports_and_evaluates(tmp_path, capsys):
    """``--memory embeddings`` (Dolphin's placement) through the whole CLI: the export's memory is the
    decoder's input, parity holds, the app's chain generates, eval writes its figures."""
    pytest.importorskip("onnxruntime_genai")
    from edgec.cli import main
    from edgec.targets.ort_context import ContextRuntime

    hf, cfg = _tiny_decoder_dir(tmp_path)
    out = tmp_path / "emb"
    assert main(["context", "train", "--out", str(out), "--decoder", str(hf), "--memory", "embeddings",
                 "--encoder-layers", "1", "--restore-steps", "1", "--continue-steps", "1", "--batch-size", "2"]) == 0
    assert main(["context", "export", str(out), "--variants", "fp32"]) == 0
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["compressor"]["memory"] == "embeddings" and "bridge_token_id" not in manifest
    assert manifest["parity_fp32"]["logits_max_abs_diff"] < 1e-2
    rt = ContextRuntime(out)
    ids = np.arange(3, 3 + 300) % 90 + 3
    x, past, past_len = rt.inputs(ids[:296], ids[296:])
    assert past_len == 0 and x.shape == (1 + 296 // 8 + 4, cfg["hidden_size"])
    assert len(rt.generate(ids[:296], ids[296:], 3)["tokens"]) == 3
    figures = tmp_path / "f.json"
    assert main(["context", "eval", str(out), "--samples", "2", "--context-tokens", "256", "--variant", "fp32",
                 "--json", str(figures)]) == 0
    r = json.loads(figures.read_text())
    assert r["spec"]["memory"] == "embeddings" and r["ttft"][0]["compressed_prefill_tokens"] == 1 + 64 // 8 + 16


def test_eval_refuses_reports_that_would_replace_its_inputs_or_special_files(tmp_path, capsys):
    from edgec.cli import main

    (tmp_path / "compressor.json").write_text("{}")
    (tmp_path / "compressor.safetensors").write_bytes(b"")
    for args, why in ((["--json", str(tmp_path / "compressor.json")], "one of the inputs"),
                      (["--json", "/dev/null"], "not a regular file"),
                      (["--json", str(tmp_path / "report.html")], "given twice"),
                      (["--threads", "0"], "--threads 0"),
                      (["--variant", "int3"], "not a decoder precision")):
        assert main(["context", "eval", str(tmp_path), *args]) == 2
        assert why in capsys.readouterr().err
    assert (tmp_path / "compressor.json").read_text() == "{}"


def test_a_manifest_that_contradicts_itself_is_refused(tmp_path):
    from edgec.targets.ort_context import MANIFEST_FORMAT, ContextRuntime

    m = {"format": MANIFEST_FORMAT, "compressor": {"group_tokens": 4, "window_tokens": 256, "hidden_size": 576}, "memory_per_window": 32,
         "doc_start_id": 0, "decoders": {"fp32": {"path": "d/model.onnx"}}, "encoder": {"path": "e.onnx"},
         "embed": {"path": "m.onnx"}}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="contradicts itself"):
        ContextRuntime(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "decoders": "fp32"}))
    with pytest.raises(ModelError, match="damaged"):
        ContextRuntime(tmp_path)
