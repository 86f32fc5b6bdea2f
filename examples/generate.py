"""Greedy text generation with an artifact of `edgec compile --model smollm2` (ONNX Runtime CPU, KV cache).

    python examples/generate.py runs/smollm2/artifacts/cpu-ort/<id> --prompt "What is a Python decorator?"

The folder holds model.onnx and the tokenizer files edgec published beside it. The prompt is wrapped
in the model's chat template (tokenizer_config.json / chat_template.jinja) unless --raw is given.
Needs onnxruntime, tokenizers/transformers and numpy; the loop itself is
edgec.targets.ort_generate.Decoder (prefill once, then one token per step with the cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path, help="artifact folder (model.onnx + tokenizer files)")
    p.add_argument("--prompt", default="Explain what a Python list comprehension is.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    args = p.parse_args()

    def fail(message: str) -> int:
        sys.stderr.write(f"generate: error: {message}\n")
        return 2
    if not (args.artifact / "model.onnx").is_file():
        return fail(f"{args.artifact}/model.onnx not found — give an artifact folder from the run's manifest.json")
    if args.max_new_tokens < 1 or args.threads < 1:
        return fail("--max-new-tokens and --threads must be at least 1")
    if not args.prompt.strip():
        return fail("the prompt is empty — give some text with --prompt")
    import json

    from transformers import AutoTokenizer

    from edgec.targets.ort_generate import Decoder, session

    try:
        tok = AutoTokenizer.from_pretrained(args.artifact, trust_remote_code=False)
    except Exception as e:  # missing or broken tokenizer files: many exception types
        return fail(f"cannot load the tokenizer in {args.artifact} ({' '.join(str(e).split())[:120]}) — the folder "
                    "needs the tokenizer files edgec published beside model.onnx")
    if args.raw or not tok.chat_template:
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    eos, context = tok.eos_token_id, None
    gen_cfg, genai_cfg = args.artifact / "generation_config.json", args.artifact / "genai_config.json"
    if gen_cfg.is_file():  # the model's own end-of-turn token (a GGUF-converted tokenizer may name another)
        ids_cfg = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        eos = ids_cfg[0] if isinstance(ids_cfg, list) else ids_cfg
    if genai_cfg.is_file():
        context = json.loads(genai_cfg.read_text()).get("model", {}).get("context_length")
    if context and len(ids) + args.max_new_tokens > context:
        return fail(f"{len(ids)} prompt tokens + {args.max_new_tokens} new exceed the model's context of {context} "
                    "tokens — shorten the prompt or lower --max-new-tokens")
    try:
        dec = Decoder(session(args.artifact / "model.onnx", args.threads))
    except Exception as e:  # not an ONNX file, or not a decoder with a KV cache
        return fail(f"{args.artifact}/model.onnx is not a decoder edgec published ({' '.join(str(e).split())[:120]})")
    t0 = time.perf_counter()
    out = dec.generate(list(ids), args.max_new_tokens, eos_id=eos)
    text = tok.decode(out["tokens"], skip_special_tokens=True)
    print(text)
    sys.stderr.write(f"[{len(ids)} prompt tokens, {len(out['tokens'])} new; TTFT {out['ttft_s'] * 1000:.0f} ms, "
                     f"{out['decode_tokens_per_s']:.1f} tokens/s, total {time.perf_counter() - t0:.1f} s]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
