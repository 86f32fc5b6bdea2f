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
    if not (args.artifact / "model.onnx").is_file():
        sys.stderr.write(f"generate: error: {args.artifact}/model.onnx not found — give an artifact folder from "
                         "the run's manifest.json\n")
        return 2
    from transformers import AutoTokenizer

    from edgec.targets.ort_generate import Decoder, session

    tok = AutoTokenizer.from_pretrained(args.artifact, trust_remote_code=False)
    if args.raw or not tok.chat_template:
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    if not ids:
        sys.stderr.write("generate: error: the prompt is empty — give some text with --prompt\n")
        return 2
    if args.max_new_tokens < 1:
        sys.stderr.write("generate: error: --max-new-tokens must be at least 1\n")
        return 2
    eos = tok.eos_token_id
    gen_cfg = args.artifact / "generation_config.json"
    if gen_cfg.is_file():  # the model's own end-of-turn token (a GGUF-converted tokenizer may name another)
        import json

        ids_cfg = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        eos = ids_cfg[0] if isinstance(ids_cfg, list) else ids_cfg
    dec = Decoder(session(args.artifact / "model.onnx", args.threads))
    t0 = time.perf_counter()
    out = dec.generate(list(ids), args.max_new_tokens, eos_id=eos)
    text = tok.decode(out["tokens"], skip_special_tokens=True)
    print(text)
    sys.stderr.write(f"[{len(ids)} prompt tokens, {len(out['tokens'])} new; TTFT {out['ttft_s'] * 1000:.0f} ms, "
                     f"{out['decode_tokens_per_s']:.1f} tokens/s, total {time.perf_counter() - t0:.1f} s]\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
