"""``edgec`` command line: ``compile``, ``prune``, ``profile``, ``targets``, ``latency build|validate``.

User errors print one line (what, why, fix) on stderr and exit 2 — no traceback.
A finished compile prints a short table and where its outputs are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Idle OpenMP threads of torch in this process would otherwise spin-wait for a while
# after each torch call and steal the cores the latency worker is timing on.
# Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edgec.errors import EdgecError

UNBOUNDED_LOG_EVERY = 10  # without a terminal, a stage of unknown length logs every this many steps


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx_model", nargs="?", metavar="MODEL.onnx",
                   help="compile this ONNX model instead of searching the built-in supernet: per-layer "
                        "quantization policy search per target, fidelity to the FP32 model as quality")
    p.add_argument("--config", help="TOML file with compile settings (flags override it)")
    p.add_argument("--model", help="fbnet-supernet (default: the built-in supernet), minilm (pretrained "
                                   "all-MiniLM-L6-v2: elastic layers/heads/FFN x per-layer precision search), "
                                   "smollm2 (SmolLM2-135M-Instruct: per-layer INT4/INT8 weight search), a Hugging "
                                   "Face encoder or *ForCausalLM directory, a .gguf file, or a path to an .onnx file")
    p.add_argument("--calib-data", help="with MODEL.onnx: .npz of ≥ 256 calibration inputs (array 'x')")
    p.add_argument("--eval-data", help="with MODEL.onnx: .npz of inputs to measure fidelity on "
                                       "(default: the calibration inputs)")
    p.add_argument("--input-shape", help="with MODEL.onnx: full input shape for dynamic dims, e.g. 1,3,224,224")
    p.add_argument("--dataset", help="digits (default) | fashion-mnist")
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--target", action="append",
                   help="target to build for (repeatable; the first is searched on, default cpu-ort)")
    p.add_argument("--objective", help="search latency objective: primary (default: the first target's p50) | "
                                       "max-latency (max over targets of p50 relative to that target's reference)")
    p.add_argument("--npu-cpu-fallback", action="store_true", default=None,
                   help="npu-qnn-htp: let nodes the HTP cannot take run on the CPU (default: such models fail)")
    p.add_argument("--budget-evals", type=int, help="candidates to compile and measure (default 100)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="percentage points of validation accuracy below the reference (default 1.0)")
    p.add_argument("--latency-budget-ms", type=float, help="p50 latency budget at batch 1, ms")
    p.add_argument("--size-budget-kb", type=float, help="model size budget, KiB")
    p.add_argument("--out", help="run directory (default runs/edgec)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--force", action="store_true", default=None, help="replace edgec's outputs in --out")
    p.add_argument("--strategy", help="nsga2 (default) | random | linas (predictor-guided, built-in supernet)")
    p.add_argument("--population-size", type=int,
                   help="NSGA-II generation size; LINAS: initial random evaluations and real evaluations "
                        "per iteration (default 16)")
    p.add_argument("--threads", type=int, help="runtime threads (default 2)")
    p.add_argument("--train-epochs", type=int, help="supernet training epochs (default per dataset)")
    p.add_argument("--max-fidelity-drop", type=float,
                   help="--model minilm: mean cosine similarity to the FP32 embeddings must stay ≥ 1 - this "
                        "(default 0.02)")
    p.add_argument("--recovery-steps", type=int,
                   help="--model minilm: after least-squares reconstruction, distil each recovered sub-network "
                        "from the FP32 model for this many steps (default 0 = none; 1.2-3 s a step measured on "
                        "2 cores; on a GPU when torch sees one)")
    p.add_argument("--recovery-candidates", type=int,
                   help="--model minilm: after the search, the fastest pruned sub-networks within reach of the "
                        "fidelity floor to recover by least-squares reconstruction (about 75 s each on 2 cores; "
                        "default 2, 0 = none)")
    p.add_argument("--sequence-length", type=int, help="--model minilm: tokens per input for latency (default 128)")
    p.add_argument("--max-ppl-increase", type=_relative,
                   help="--model smollm2: perplexity on the evaluation text may rise at most this much above FP32's, "
                        "as a fraction or percentage (default 10%%)")
    p.add_argument("--finetune-epochs", type=int,
                   help="after the search, fine-tune alone for this many epochs the reference, then Pareto architectures "
                        "picked by bisection for the fastest that comes within --max-accuracy-drop of it (distilled from "
                        "the fine-tuned reference), then measure and choose again (default 0: off)")
    p.add_argument("--finetune-top", type=int,
                   help="at most this many architectures besides the reference are fine-tuned (default 4)")
    p.add_argument("--finetune-child-epochs", type=int,
                   help="epochs for each architecture besides the reference (default: --finetune-epochs); small "
                        "children train 6-25x faster than the largest, so they can afford more")
    p.add_argument("--executor", help="in-process (default) | ray: candidate builds as Ray tasks, latency and "
                                      "device profiles on Ray nodes advertising the resource target:<name>")
    p.add_argument("--ray-address", help="with --executor ray: the cluster to join (default: start a local Ray)")
    p.add_argument("--storage", help="keep the NSGA-II search state in an Optuna RDB that several searches share: "
                                     "sqlite:///FILE.db or postgresql://USER@HOST/DB")
    p.add_argument("--study-name", help="with --storage: the shared study (default: derived from the settings "
                                        "searches must agree on)")
    p.add_argument("--prune-flops-target", type=float,
                   help="after the search, PAGCP-prune the chosen subnet (FP32) by this fraction of its FLOPs, "
                        "fine-tune and measure it; outputs in OUT/pruned/")
    p.add_argument("--prune-round-to", type=int, metavar="N",
                   help="with --prune-flops-target: kept channel counts are multiples of N (default 8)")


def _relative(text: str) -> float:
    """``"10%"`` → 0.10, ``"0.1"`` → 0.1 (argparse type: a bad value exits 2 with one line)."""
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or percentage (e.g. 10%)") from None


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="multitask",
                   help="multitask (built-in, default) or your model as package.module:factory")
    p.add_argument("--checkpoint", help="your model's weights: .safetensors, or a torch state dict "
                                        "(read with weights_only=True)")
    p.add_argument("--task", action="append", metavar="NAME=KIND:OUTPUT",
                   help="your model's tasks (repeatable): KIND classification | dense, OUTPUT = output number")
    p.add_argument("--train-data", help="your model: .npz with x and one array per task (BN recalibration, "
                                        "fine-tuning)")
    p.add_argument("--eval-data", help="your model: .npz with x and one array per task (the oracle and the report)")
    p.add_argument("--dataset", default="digits", help="digits (default) | fashion-mnist")
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--flops-target", type=float,
                   help="fraction of FLOPs to remove, e.g. 0.6 (passes repeat with a doubled loss budget until met)")
    p.add_argument("--loss-budget", type=float, default=0.3,
                   help="relative rise each task's validation loss may take over one pass (default 0.3)")
    p.add_argument("--max-task-drop", action="append", metavar="TASK=VALUE",
                   help="after fine-tuning, at most this drop on the validation split in the task's metric "
                        "(accuracy points or PSNR dB), e.g. classification=1.0 reconstruction=0.5 (repeatable); "
                        "missed → exit 3 with the report written")
    p.add_argument("--watch", action="append", metavar="TASK",
                   help="tasks the pruning oracle checks (repeatable; default all; the built-in model's are "
                        "classification and reconstruction)")
    p.add_argument("--importance", default="l1", help="channel importance within a group: l1 (default) | l2 filter norm, or taylor "
                        "(first-order loss change per task, from the gradients of up to 1024 training images — "
                        "the oracle's validation images without --train-data)")
    p.add_argument("--step", type=float, default=0.05, help="pruning-ratio step per trial (default 0.05)")
    p.add_argument("--round-to", type=int, default=8, metavar="N",
                   help="kept channel counts are multiples of N (default 8; ONNX Runtime's CPU convs pad widths to "
                        "their channel block, 16 with AVX-512; steps of 16 are too coarse for the loss oracle "
                        "unless --trial-steps fine-tunes the trials)")
    p.add_argument("--trial-steps", type=int, default=0, metavar="N",
                   help="fine-tune every pruning trial for N minibatches before the oracle reads its losses, held "
                        "against the unpruned model fine-tuned the same way (NetAdapt's short-term fine-tuning; "
                        "default 0 = read them right after the cut; needs training data)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after pruning (default per dataset)")
    p.add_argument("--recovery-epochs", type=int, default=1,
                   help="with --flops-target: fine-tuning epochs between pruning passes (default 1; 0 = none)")
    p.add_argument("--kd-weight", type=float, default=0.0,
                   help="the fine-tuning after pruning distills the classification tasks from the unpruned model with "
                        "this weight, 0..1 (default 0 = cross-entropy only; the recovery epochs stay plain)")
    p.add_argument("--task-weight", action="append", metavar="TASK=W",
                   help="the fine-tuning after pruning weighs TASK's loss by W (repeatable; default 1, and 10 for a "
                        "dense task's MSE), e.g. reconstruction=40 to trade accuracy for PSNR")
    p.add_argument("--max-passes", type=int, default=30,
                   help="with --flops-target: at most this many passes over all layers (default 30; the loss "
                        "budget's growth cap usually ends them first)")
    p.add_argument("--train-epochs", type=int, help="training epochs of the built-in model (default per dataset)")
    p.add_argument("--threads", type=int, default=2, help="threads for training and the runtime (default 2)")
    p.add_argument("--runs", type=int, default=300, help="timed runs per latency measurement (default 300)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (default 0)")
    p.add_argument("--out", default="runs/prune", help="run directory (default runs/prune)")
    p.add_argument("--force", action="store_true", help="replace edgec's outputs in --out")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other user error
        sys.stderr.write(f"edgec: error: {message} — see '{self.prog} --help'\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="edgec", description="Edge-deployment compiler: search, compile, profile, publish.",
                             allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    p = sub.add_parser("compile", help="search, compile, measure and publish models", allow_abbrev=False)
    _compile_args(p)
    p = sub.add_parser("prune", help="PAGCP channel pruning of a multi-task CNN, fine-tuned, exported and measured",
                       allow_abbrev=False)
    _prune_args(p)
    p = sub.add_parser("profile", help="measure an ONNX model's latency on targets", allow_abbrev=False)
    p.add_argument("model", help="ONNX file")
    p.add_argument("--target", action="append", help="target name (repeatable; default cpu-ort)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    p.add_argument("--runs", type=int, default=300, help="timed runs (default 300)")
    p.add_argument("--calib-data", help=".npz of ≥ 256 inputs (array 'x') to quantize a float model for a "
                   "target that needs it (npu-qnn-htp); without it such targets calibrate on random inputs")
    p.add_argument("--npu-cpu-fallback", action="store_true",
                   help="npu-qnn-htp: let nodes the HTP cannot take run on the CPU and report them "
                        "(default: such a model fails)")
    p.add_argument("--htp-fp16", action="store_true",
                   help="npu-qnn-htp: run a float model in fp16 on the HTP instead of quantizing it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("targets", help="list the known targets and whether they are available here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("latency", help="build and validate a target's latency models (kernel-level predictor, lookup table)", allow_abbrev=False)
    lat = p.add_subparsers(dest="latency_command", metavar="build|validate", required=True,
                           parser_class=_ArgumentParser)
    for name, text in (("build", "measure random candidates of the space on the target and fit the model"),
                       ("validate", "measure held-out random candidates and compare them with the model")):
        q = lat.add_parser(name, help=text, allow_abbrev=False)
        q.add_argument("--target", default="cpu-ort", help="target: cpu-ort (default), cpu-openvino or npu-qnn-htp")
        q.add_argument("--dataset", default="fashion-mnist",
                       help="the FBNet space sized for this dataset: fashion-mnist (default) | digits")
        q.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files")
        q.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
        q.add_argument("--runs", type=int, help="timed runs per measurement (default: 200 on cpu-ort and "
                                                "cpu-openvino, the simulator's 5 on npu-qnn-htp)")
        q.add_argument("--seed", type=int, default=0, help="seed of the random candidates (default 0)")
        if name == "build":
            q.add_argument("--samples", type=int, default=300, help="measured candidates to fit on (default 300)")
            q.add_argument("--no-lut", action="store_true",
                           help="skip FBNet's per-block lookup table (every block choice measured alone; 356 parts, ≈ 6 min on "
                                "cpu-ort, ≈ 8 min on npu-qnn-htp, ≈ 10 min on cpu-openvino); "
                                "a table built with an earlier model is removed, as it no longer matches")
        else:
            q.add_argument("--subnets", type=int, default=100, help="held-out candidates (default 100)")
            q.add_argument("--json", metavar="FILE", help="write the figures (within_10pct, rmspe, spearman) here")
            q.add_argument("--html", metavar="FILE", help="write the report with the scatter plot here "
                                                          "(default: latency-<target>-<dataset>.html in the "
                                                          "current folder)")
    _context_args(sub)
    return parser


def _context_args(sub) -> None:
    p = sub.add_parser("context", help="a Dolphin-style context compressor for an on-device LLM: train, export, eval",
                       allow_abbrev=False)
    ctx = p.add_subparsers(dest="context_command", metavar="train|export|eval", required=True,
                           parser_class=_ArgumentParser)
    from edgec.compile.context import MEMORY_KINDS
    from edgec.context_job import DEFAULT_DIR, DEFAULT_TAIL_TOKENS, ENCODER_VARIANTS, TrainSettings

    TAIL_HELP = (f"a context's last tokens kept as text, at most half its decoder positions; the memory covers the "
                 f"tokens before them (default {DEFAULT_TAIL_TOKENS}; 0 compresses the whole context)")

    d = TrainSettings()
    q = ctx.add_parser("train", help="train the projector with the decoder frozen (restoration, continuation, then optionally contrast)",
                       allow_abbrev=False)
    q.add_argument("--out", default=str(DEFAULT_DIR), help=f"output folder (default {DEFAULT_DIR}); rerunning "
                   "the same command resumes from its last checkpoint")
    q.add_argument("--decoder", default=d.decoder, help="the frozen decoder: smollm2 (default), a Llama-family "
                   "GGUF file or Hugging Face directory")
    q.add_argument("--encoder-layers", type=int, default=d.encoder_layers,
                   help=f"decoder blocks reused as the context encoder (default {d.encoder_layers})")
    q.add_argument("--group-tokens", type=int, default=d.group_tokens,
                   help=f"context tokens per memory embedding = compression ratio (default {d.group_tokens}: "
                        "32 memory embeddings per 256-token window)")
    q.add_argument("--memory", default=d.memory, choices=MEMORY_KINDS,
                   help="where the memory enters the decoder: kv (default; every layer's key/value cache, "
                        "prefix-tuning's placement) or embeddings (input embeddings, as Dolphin)")
    q.add_argument("--restore-steps", type=int, default=d.restore_steps,
                   help=f"restoration steps (default {d.restore_steps})")
    q.add_argument("--continue-steps", type=int, default=d.continue_steps,
                   help=f"continuation steps (default {d.continue_steps})")
    q.add_argument("--batch-size", type=int, default=d.batch_size, help=f"passages per step (default {d.batch_size})")
    q.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr:g})")
    q.add_argument("--distill", type=float, default=d.distill,
                   help="weight of a distillation term in continuation (KL to the decoder reading the full "
                        "context as text); 0 = off (default: it measured 2.8× slower per step for a small gain)")
    q.add_argument("--contrast-steps", type=int, default=d.contrast_steps,
                   help="steps of a third stage that reads the context as the app does (memory + --tail-tokens "
                        "as text) and trains another passage's memory to be worth no more than the tail alone, "
                        f"so the memory carries its own document (default {d.contrast_steps}); on a folder "
                        "trained without it, adds the stage to that compressor")
    q.add_argument("--contrast", type=float, default=d.contrast,
                   help=f"weight of the contrast stage's other-passage term (default {d.contrast:g})")
    q.add_argument("--tail-tokens", type=int, default=d.tail_tokens, help="in the contrast stage: " + TAIL_HELP)
    q.add_argument("--seed", type=int, default=d.seed, help="seed of the batches (default 0)")
    q.add_argument("--threads", type=int, default=d.threads, help="torch threads (default 2)")
    q.add_argument("--force", action="store_true", help="start over, replacing a trained compressor or checkpoint")
    q = ctx.add_parser("export", help="ONNX graphs (encoder + projector, embedding, decoder with inputs_embeds "
                       "and KV cache per precision), parity-checked, with a manifest", allow_abbrev=False)
    q.add_argument("folder", nargs="?", default=str(DEFAULT_DIR), help=f"the trained compressor (default {DEFAULT_DIR})")
    q.add_argument("--variants", default="fp32,int8w", help="decoder precisions: fp32 (required), int8w, int4w "
                   "(default fp32,int8w)")
    q.add_argument("--threads", type=int, default=2, help="runtime threads (default 2)")
    q.add_argument("--tail-tokens", type=int, default=DEFAULT_TAIL_TOKENS, help=TAIL_HELP)
    q = ctx.add_parser("eval", help="perplexity with no / full / compressed / truncated context, controls and the "
                       "truncation curve (what the memory is worth in tokens of text); "
                       "TTFT and peak memory on cpu-ort", allow_abbrev=False)
    q.add_argument("folder", nargs="?", default=str(DEFAULT_DIR), help=f"the trained compressor (default {DEFAULT_DIR})")
    q.add_argument("--context-tokens", type=int, default=512, help="context length for perplexity (default 512)")
    q.add_argument("--samples", type=int, default=48, help="held-out passages (default 48)")
    q.add_argument("--variant", default="fp32", help="decoder precision for the timings (default fp32)")
    q.add_argument("--encoder", default="int8", choices=tuple(ENCODER_VARIANTS),
                   help="encoder graph for the timings, its memory's perplexity is reported too (default int8: "
                        "dynamic INT8 MatMuls, about 2x faster; with the default 4 blocks its perplexity measured "
                        "10.56 vs 10.44 in FP32)")
    q.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    q.add_argument("--tail-tokens", type=int, default=DEFAULT_TAIL_TOKENS, help=TAIL_HELP + "; the export is "
                   "redone when it was made with another value")
    q.add_argument("--json", metavar="FILE", help="write the figures here (gap_closure, ttft_speedup_1024, ...)")
    q.add_argument("--html", metavar="FILE", help="write the report here (default <folder>/report.html)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanups (``finally``, temporary folders) run as on Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "compile":
            return cmd_compile(args)
        if args.command == "prune":
            return cmd_prune(args)
        if args.command == "profile":
            return cmd_profile(args)
        if args.command == "latency":
            return cmd_latency(args)
        if args.command == "context":
            return cmd_context(args)
        return cmd_targets(args)
    except EdgecError as e:
        sys.stderr.write(f"edgec: error: {e.line()}\n")
        return e.exit_code
    except OSError as e:
        from edgec.targets.worker import DISK_FULL_ERRNOS

        if e.errno not in DISK_FULL_ERRNOS:
            raise  # anything else is a bug: its traceback is wanted
        resume = " with --resume" if args.command == "compile" else ""
        where = f" writing {e.filename}" if e.filename else ""
        sys.stderr.write(f"edgec: error: the disk is full{where}: {e.strerror} — free space (or raise the file-size "
                         f"limit) and rerun the same command{resume}; nothing half-written was kept\n")
        return 2
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, _Terminated) else 130
        if args.command == "compile":
            sys.stderr.write("edgec: interrupted — rerun the same command with --resume to continue\n")
        elif args.command == "context" and args.context_command == "train":
            sys.stderr.write("edgec: interrupted — rerun the same command to resume from the last checkpoint "
                             "(one every 25 steps; none before step 25)\n")
        else:
            sys.stderr.write("edgec: interrupted\n")
        return code


def _check_writable(*paths: Path | None, protect: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, report paths that cannot be written (one-line :class:`ConfigError`): the same
    path twice, a folder, a special file (/dev/null), a missing or read-only folder, an existing read-only
    file, or one of the files in ``protect`` (inputs the report would replace)."""
    from edgec.errors import ConfigError

    given = [p for p in paths if p]
    if len({p.resolve() for p in given}) < len(given):
        raise ConfigError(f"the same file is given twice: {given[0]}", "one report would overwrite the other",
                          "pass different paths")
    protected = {q.resolve() for q in protect}
    for p in given:
        why = ("it is a folder" if p.is_dir() else "it is not a regular file" if p.exists() and not p.is_file()
               else "it is one of the inputs" if p.resolve() in protected
               else None if p.parent.is_dir() else "its folder does not exist")
        if why is None:
            try:
                tempfile.TemporaryFile(dir=p.parent).close()
                if p.exists() and not os.access(p, os.W_OK):
                    why = "the file is read-only"
            except OSError as e:
                why = e.strerror or str(e)
        if why:
            raise ConfigError(f"cannot write {p}", why, "pass a file path in a writable folder")


def _write_reports(out, html_path: Path, html_text: str, json_path: Path | None, result: dict) -> None:
    """Write the HTML report and, when asked, the figures as JSON (each atomically), and say where."""
    from edgec.compile.package import write_atomic

    write_atomic(html_path, html_text)
    if json_path:
        write_atomic(json_path, json.dumps(result, indent=1))
    out.print(f"Report: {html_path}" + (f"; figures: {json_path}" if json_path else ""))


def cmd_context(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgec import context_job as job
    from edgec.report import break_even_text, context_html, memory_noun, text_equivalent_text

    out = _stdout_console()
    if args.context_command == "train":
        settings = job.TrainSettings(out=args.out, decoder=args.decoder, encoder_layers=args.encoder_layers,
                                     group_tokens=args.group_tokens, memory=args.memory,
                                     restore_steps=args.restore_steps,
                                     continue_steps=args.continue_steps, batch_size=args.batch_size, lr=args.lr,
                                     distill=args.distill, contrast_steps=args.contrast_steps, contrast=args.contrast,
                                     tail_tokens=args.tail_tokens, seed=args.seed, threads=args.threads,
                                     force=args.force)
        with _RichProgress(Console(stderr=True)) as progress:
            meta = job.train(settings, progress)
        t = meta["training"]
        out.print(f"Compressor trained in {t['train_s'] / 60:.1f} min of training (all runs of it; {t['steps']} steps, "
                  f"{meta['trainable_parameters'] / 1e6:.1f}M trainable parameters, "
                  f"{meta['spec']['group_tokens']}× compression); final losses "
                  + ", ".join(f"{k} {v:.3f}" for k, v in t["final_loss"].items()) + f" (means of each stage's last 25 "
                  f"steps): {args.out}")
        out.print(f"Next: edgec context export {args.out}  (edgec context eval {args.out} exports first when needed)")
        return 0
    if args.context_command == "export":
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        with _RichProgress(Console(stderr=True)) as progress:
            m = job.export(Path(args.folder), variants, args.threads, progress, args.tail_tokens)
        p = m["parity_fp32"]
        out.print(f"Exported to {Path(args.folder) / 'onnx'}: encoder + projector, embedding, decoder "
                  f"({', '.join(m['decoders'])}); parity with PyTorch: memory |Δ| {p['memory_max_abs_diff']:.1e}, "
                  f"logits |Δ| {p['logits_max_abs_diff']:.1e}, same next token: {p['same_next_token']}")
        return 0
    if args.json == "" or args.html == "":
        from edgec.errors import ConfigError

        raise ConfigError("--json/--html is empty", "a file path is needed", "pass a path, or leave the option out")
    json_path = Path(args.json) if args.json else None
    html_path = Path(args.html) if args.html else Path(args.folder) / "report.html"
    folder = Path(args.folder)
    job.require_trained(folder)
    _check_writable(json_path, html_path, protect=(folder / "compressor.json", folder / "compressor.safetensors",
                                                   folder / "checkpoint.json", folder / "checkpoint.safetensors",
                                                   folder / "onnx" / "manifest.json"))
    with _RichProgress(Console(stderr=True)) as progress:
        result = job.evaluate(Path(args.folder), args.context_tokens, args.samples, args.variant, args.threads,
                              progress, args.encoder, args.tail_tokens)
    ppl = result["perplexity"]
    t_len = ppl.get("tail_tokens", 0)
    table = Table(title=f"continuation perplexity, {ppl['context_tokens']}-token context → N = {ppl['memory_tokens']} "
                        f"positions: {ppl['memory_tokens'] - t_len} {memory_noun(result['spec'])} + the last {t_len} "
                        f"tokens as text ({result['eval_samples']} held-out passages)")
    table.add_column("condition")
    table.add_column("perplexity", justify="right")
    for k, text in result["conditions"].items():
        table.add_row(f"({k[0]}) {text}", f"{ppl[k]:.3f}")
    out.print(table)
    out.print(text_equivalent_text(result))
    out.print(f"(c) with the memory of the {result['encoder']} ONNX encoder (the one timed below): "
              f"{result['c_compressed_onnx_encoder']:.3f}")
    t = Table(title=f"time to first token on cpu-ort ({result['encoder']} encoder, {result['variant']} decoder, "
                    f"{result['threads']} threads, medians, measured)")
    for col in ("context", "memory + text", "full prefill ms", "compressed ms", "of which encoder ms", "speed-up"):
        t.add_column(col, justify="right")
    for r in result["ttft"]:
        t.add_row(str(r["context_tokens"]), f"{r['memory_tokens']} + {r.get('tail_tokens', 0)}", f"{r['full_ttft_ms']:.1f}",
                  f"{r['compressed_ttft_ms']:.1f}", f"{r['encoder_ms']:.1f}", f"{r['ttft_speedup']:.2f}×")
    out.print(t)
    gap = result["gap_closure"]
    out.print(f"gap closure {'n/a' if gap is None else f'{gap * 100:.1f} %'} · compressed beats last-N text: "
              f"{result['c_beats_d']} · TTFT speed-up at 1024 tokens {result['ttft_speedup_1024'] or float('nan'):.2f}× · "
              f"break-even context {break_even_text(result)} · compression {result['compression_ratio']}×")
    for mode, d in (result.get("peak_memory_1024") or {}).items():
        out.print(f"peak memory at 1024 tokens, {mode}: {d['peak_rss_bytes'] / 2**20:.0f} MiB resident "
                  f"({d['inference_peak_bytes'] / 2**20:.0f} MiB above the loaded sessions)")
    _write_reports(out, html_path, context_html(result), json_path, result)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgec.latency_job import SMALL_FIT_SAMPLES, LatencySettings, build_model, command_line, validate_model
    from edgec.report import latency_validation_html

    settings = LatencySettings(target=args.target, dataset=args.dataset, data_dir=args.data_dir,
                               threads=args.threads, runs=args.runs, seed=args.seed,
                               **({"samples": args.samples, "lut": not args.no_lut} if args.latency_command == "build"
                                  else {"subnets": args.subnets}))
    settings.check()
    out = _stdout_console()
    if args.latency_command == "build":
        with _RichProgress(Console(stderr=True)) as progress:
            model, path = build_model(settings, progress)
        fit = model.meta
        out.print(f"Latency model for {fit['target']} ({fit['space']}, {fit['device']}, {fit['runtime']}, "
                  f"{fit['threads']} threads) fit on {fit['samples']} measured candidates in "
                  f"{fit['build_s'] / 60:.1f} min: {path}")
        if isinstance(fit.get("replaced"), dict):
            out.print(f"It replaced the model fit on {fit['replaced'].get('samples')} candidates "
                      f"(built {fit['replaced'].get('built_at')}) for the same target, space and machine.")
        if fit.get("samples_noisy_left_out"):
            out.print(f"{len(fit['samples_noisy_left_out'])} candidate(s) never measured quietly (the anchor over "
                      f"{fit['quiet_tolerance']}× its session's reference p50, even when measured again) were left "
                      "out of the fit.")
        own = model.fit_metrics()
        out.print(f"On its own samples: {own['within_10pct'] * 100:.0f} % within ±10 %, RMSPE {own['rmspe'] * 100:.1f} %.")
        if fit["samples"] < SMALL_FIT_SAMPLES:
            out.print(f"[yellow]Only {fit['samples']} candidates for up to {len(model.coef) + 1} fitted coefficients: "
                      "its fit on its own samples says little. Only held-out candidates ('edgec latency validate') "
                      f"tell how far to trust it; {SMALL_FIT_SAMPLES}+ samples are usual.[/yellow]")
        if own["within_10pct"] < 0.8 and model.meta.get("latency_kind") == "simulated":
            out.print("[yellow]That is low for a fit on its own samples: the kernels' MACs and sizes explain the HTP "
                      "simulator's cycles poorly (its repeated runs agree within ~1 %, so it is not noise) — trust "
                      "the model's ranking roughly, not its values.[/yellow]")
        elif own["within_10pct"] < 0.8:
            out.print("[yellow]That is low for a fit on its own samples: the measurements look noisy — was the "
                      "machine busy? Build again on a quiet machine.[/yellow]")
        from edgec.latency_job import MODEL_TARGETS, lut_path

        if settings.lut and MODEL_TARGETS[settings.target].lut:
            out.print(f"Lookup table (FBNet, every block choice measured alone): {lut_path(path)}")
        elif settings.lut:
            out.print(f"No lookup table on {settings.target}: edgec does not measure one there; the kernel-level "
                      "model is built.")
        out.print(f"Next: {command_line('validate', settings)}")
        return 0
    json_path = Path(args.json) if args.json else None
    html_path = Path(args.html or f"latency-{settings.target}-{settings.dataset}.html")

    from edgec.pipeline import cache_root

    models = cache_root() / "latency"  # the models, tables and validation records must not be overwritten
    _check_writable(json_path, html_path,  # before any measuring: a report that cannot be written
                    protect=tuple(models.iterdir()) if models.is_dir() else ())
    with _RichProgress(Console(stderr=True)) as progress:
        result = validate_model(settings, progress)
    table = Table(title=f"latency model validation — {result['target']}, {result['space']} ({result['latency_kind']})")
    for col in ("model", "held-out", "within ±10 %", "RMSPE", "median |err|", "Spearman", "fit: within ±10 %"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in (("kernel-level", result), ("lookup table", result.get("lut"))):
        if r:
            table.add_row(name, str(r["n"]), f"{r['within_10pct'] * 100:.1f} %", f"{r['rmspe'] * 100:.1f} %",
                          f"{r['median_abs_pct_error']:.1f} %", f"{r['spearman']:.3f}",
                          f"{r['fit']['within_10pct'] * 100:.1f} %" if "fit" in r else "–")
    out.print(table)
    if result["noisy_left_out"]:
        out.print(f"{len(result['noisy_left_out'])} held-out candidate(s) never measured quietly (their anchor ran over "
                  f"{result['quiet_tolerance']}× its session's reference p50) are left out of these figures; "
                  "listed in --json.")
    if not result["built_here"]:
        b, h = result["built_on"], result["validated_on"]
        out.print(f"The model was built on another machine ({b['runtime']}, {b['device']}, {b['threads']} threads); "
                  f"these figures are for this one ({h['runtime']}, {h['device']}, {h['threads']} threads) and are "
                  "recorded next to the model, where LINAS's latency prior looks for them.")
    from edgec.latency_job import PRIOR_MIN_SPEARMAN

    linas = f"edgec compile --strategy linas --target {settings.target} --dataset {settings.dataset}"
    if result["spearman"] >= PRIOR_MIN_SPEARMAN:
        out.print(f"Spearman {result['spearman']:.3f} ≥ {PRIOR_MIN_SPEARMAN}: '{linas}' uses this model's measured "
                  "candidates as its latency prior.")
    else:
        out.print(f"[yellow]Spearman {result['spearman']:.3f} < {PRIOR_MIN_SPEARMAN}: '{linas}' will not use this "
                  f"model; build it again on a quiet machine, with more --samples.[/yellow]")
    _write_reports(out, html_path, latency_validation_html(result), json_path, result)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgec.config import CompileConfig
    from edgec.errors import NoQualifyingCandidate
    from edgec.onnx_input import run_onnx_compile
    from edgec.pipeline import run_compile

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "onnx_model")}
    if args.onnx_model:
        if args.model:
            from edgec.errors import ConfigError

            raise ConfigError("both MODEL.onnx and --model given", "edgec compiles one model per run",
                              "pass only one of them")
        overrides["model"] = args.onnx_model
    cfg = CompileConfig.from_sources(args.config, overrides)
    console = Console(stderr=True)
    with _RichProgress(console) as progress:
        try:
            if cfg.is_decoder:
                from edgec.decoder_job import run_decoder_compile

                result = run_decoder_compile(cfg, progress)
            elif cfg.is_transformer:
                from edgec.transformer_job import run_transformer_compile

                result = run_transformer_compile(cfg, progress)
            else:
                result = (run_onnx_compile if cfg.is_onnx_input else run_compile)(cfg, progress)
        except NoQualifyingCandidate:
            progress.close()
            raise
    (_print_decoder_summary if cfg.is_decoder else _print_transformer_summary if cfg.is_transformer
     else _print_summary)(result, _stdout_console())
    return 0


def _print_transformer_summary(result, console) -> None:
    from rich.table import Table

    from edgec.report import speed_text

    r = result.report
    table = Table(title=f"edgec compile — {r['model']['name']} (finalists on the evaluation split)")
    for col in ("id", "candidate", "mean cosine", "NN agree %", "p50 ms", "vs FP32", "MiB", "kind"):
        table.add_column(col, justify="left" if col in ("id", "candidate", "kind") else "right")
    ref = r["reference"]
    table.add_row("reference", "FP32, optimum export", "1.0000", "100.0", f"{ref['latency']['p50_ms']:.2f}", "1.00×",
                  f"{ref['size_bytes'] / 2**20:.1f}", ref["latency"]["kind"])
    for f in r["finalists"]:
        table.add_row(f["candidate_id"] + (" ★" if f["chosen"] else ""), f["summary"],
                      f"{f['fidelity_eval']['cosine']:.4f}", f"{f['fidelity_eval']['neighbour_agreement'] * 100:.1f}",
                      f"{f['latency']['p50_ms']:.2f}", f"{f['speedup_p50']:.2f}×", f"{f['size_bytes'] / 2**20:.1f}",
                      f["latency"]["kind"])
    console.print(table)
    c = r["chosen"]
    console.print(f"{r['evaluated']} candidates evaluated on cpu-ort ({r['latency_input']['sequence_length']} tokens, "
                  f"batch 1). Chosen {c['candidate_id']}: {speed_text(c['speedup_p50'])} than FP32 at mean cosine "
                  f"{c['fidelity_eval']['cosine']:.4f}. Outputs: {result.out}/report.html, report.json, manifest.json")


def _print_decoder_summary(result, console) -> None:
    from rich.table import Table

    r = result.report
    table = Table(title=f"edgec compile — {r['model']['name']} (evaluation windows; timing measured side by side)")
    for col in ("id", "candidate", "perplexity", "vs FP32", "greedy agree", "TTFT ms", "decode tok/s", "vs FP32", "MiB"):
        table.add_column(col, justify="left" if col in ("id", "candidate") else "right")
    for name, f in (("reference", r["reference"]), ("fp32-fused", r["fp32_fused"]),
                    *((x["candidate_id"] + (" ★" if x["chosen"] else ""), x) for x in r["finalists"])):
        table.add_row(name, f["summary"], f"{f['ppl_eval']:.3f}", f"{f['ppl_increase'] * 100:+.1f}%",
                      f"{f['greedy_agreement']['prefix'] * 100:.0f}%", f"{f['timing']['ttft_ms']:.0f}",
                      f"{f['timing']['decode_tokens_per_s']:.1f}", f"{f['decode_speedup']:.2f}×",
                      f"{f['size_bytes'] / 2**20:.1f}")
    console.print(table)
    c = r["chosen"]
    console.print(f"{r['evaluated']} candidates evaluated on cpu-ort. Chosen {c['candidate_id']}: "
                  f"{c['timing']['decode_tokens_per_s']:.1f} decode tokens/s ({c['decode_speedup']:.2f}× FP32), "
                  f"perplexity {c['ppl_increase'] * 100:+.1f}%, {c['size_ratio'] * 100:.0f}% of the FP32 size. "
                  f"Outputs: {result.out}/report.html, report.json, manifest.json; "
                  f"generate: python examples/generate.py {result.out}/{result.report['artifacts'][-1]['path'].rsplit('/', 1)[0]}")


def _task_numbers(items: list[str] | None, flag: str, example: str) -> dict[str, float]:
    """{task: number} from repeated ``TASK=NUMBER`` values of ``flag``; :class:`ConfigError` on another form."""
    from edgec.errors import ConfigError

    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"bad {flag} {item!r}", "expected TASK=NUMBER", example) from None
        if key.strip() in out:
            raise ConfigError(f"{flag} names task {key.strip()!r} twice", f"got {out[key.strip()]:g} and {number:g}",
                              "give each task once")
        out[key.strip()] = number
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgec.errors import ConfigError
    from edgec.prune import PruneConfig, gate_error, run_prune
    from edgec.report import speed_text

    if not args.out.strip():
        raise ConfigError("--out is empty", "edgec prune writes a run directory", "e.g. --out runs/prune")
    if args.model.startswith("subnet:"):  # edgec compile --prune-flops-target's own mode
        raise ConfigError(f"unknown --model {args.model!r}", "subnet:… is how edgec compile names its chosen subnet",
                          "pass multitask or package.module:factory (or use edgec compile --prune-flops-target)")

    drops = _task_numbers(args.max_task_drop, "--max-task-drop",
                          "e.g. --max-task-drop classification=1.0 --max-task-drop reconstruction=0.5")
    weights = _task_numbers(args.task_weight, "--task-weight", "e.g. --task-weight reconstruction=40")
    cfg = PruneConfig(out=Path(args.out), dataset=args.dataset, data_dir=args.data_dir, model=args.model,
                      checkpoint=args.checkpoint, tasks=tuple(args.task or ()), train_data=args.train_data,
                      eval_data=args.eval_data,
                      flops_target=args.flops_target, loss_budget=args.loss_budget, max_task_drop=drops,
                      watch=tuple(args.watch or ()), importance=args.importance, step=args.step, round_to=args.round_to,
                      trial_steps=args.trial_steps, finetune_epochs=args.finetune_epochs,
                      recovery_epochs=args.recovery_epochs,
                      kd_weight=args.kd_weight, task_weights=weights, max_passes=args.max_passes,
                      train_epochs=args.train_epochs, threads=args.threads,
                      runs=args.runs, seed=args.seed, force=args.force)
    with _RichProgress(Console(stderr=True)) as progress:
        result = run_prune(cfg, progress)
    r = result.report
    table = Table(title=f"edgec prune — {r['model']['name']} on {r['dataset']['name']} (PAGCP)")
    tasks = r["tasks"]
    from edgec.search.multitask import METRIC_LABELS as unit
    for col in ("model", "MMACs", "params k", *(f"{t['name']} {unit[t['metric']]}" for t in tasks),
                "cpu-ort p50 µs", "kind"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    lat, met = r["latency"], r["metrics"]
    for label, key, macs, params in (("unpruned", "reference", r["macs_before"], r["params_before"]),
                                     ("pruned + fine-tuned", "pruned", r["macs_after"], r["params_after"])):
        split = met[key]["test"]
        table.add_row(label, f"{macs / 1e6:.2f}", f"{params / 1e3:.1f}",
                      *(f"{split[t['name']][t['metric']]:.2f}" for t in tasks),
                      f"{lat[key]['p50_ms'] * 1e3:.1f}", lat[key]["kind"])
    console = _stdout_console()
    console.print(table)
    why = (f"within --max-passes {r['config']['max_passes']}" if r["algorithm"].get("stopped_by") == "max_passes"
           else "within the loss budget")
    console.print(f"Metrics on {r['dataset'].get('test_split', 'the test split')}. FLOPs removed: "
                  f"{r['flops_reduction'] * 100:.1f}% in {r['algorithm']['passes']} pass(es)"
                  + ("" if r["flops_target_met"] is not False else f" (the --flops-target was not reached {why})")
                  + f"; cpu-ort p50 {speed_text(lat['speedup_p50'])}. "
                  f"Outputs: {result.out}/report.html, report.json, manifest.json")
    if r["macs_after"] == r["macs_before"]:
        console.print("No channels were removed: every layer's first step broke a task's loss budget (the speed "
                      "ratio is noise; the manifest marks the unpruned model chosen). Raise --loss-budget, or set "
                      "--flops-target to let passes repeat.")
    oracle = r["algorithm"]["oracle"]
    if oracle.get("trial_finetune_steps_requested", 0) > oracle.get("trial_finetune_steps", 0):
        console.print(f"--trial-steps {oracle['trial_finetune_steps_requested']} ran "
                      f"{oracle['trial_finetune_steps']} minibatches per trial: one pass over the training images "
                      "is the most it runs.")
    error = gate_error(cfg, result)
    if error is not None:
        raise error
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgec.errors import ConfigError, ModelError
    from edgec.targets import open_target

    for name, low, high in (("batch", 1, 4096), ("threads", 1, 256), ("runs", 1, 100_000)):
        value = getattr(args, name)
        if not low <= value <= high:
            raise ConfigError(f"bad value for --{name}: {value}", f"it must be between {low} and {high}",
                              f"e.g. --{name} {low if name != 'threads' else 2}")
    names = args.target or ["cpu-ort"]
    if len(set(names)) != len(names):
        raise ConfigError("a --target is named twice", f"got {', '.join(names)}", "name each target once")
    if args.htp_fp16 and ("npu-qnn-htp" not in names or args.calib_data):
        raise ConfigError("--htp-fp16 runs a float model in fp16 on npu-qnn-htp",
                          "it needs --target npu-qnn-htp and no --calib-data (nothing is quantized)",
                          "add --target npu-qnn-htp and drop --calib-data, or drop --htp-fp16")
    if args.npu_cpu_fallback and "npu-qnn-htp" not in names:
        raise ConfigError("--npu-cpu-fallback applies to npu-qnn-htp", f"targets: {', '.join(names)}",
                          "add --target npu-qnn-htp or drop --npu-cpu-fallback")
    path = Path(args.model)
    if not path.is_file():
        raise ModelError(f"model {path} not found" if not path.exists() else f"{path} is not a file",
                         "edgec profile needs an ONNX file", "pass the path of a .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"model {path} is empty", "a 0-byte file is no ONNX model", "pass a valid .onnx file")
    from edgec.compile.source import load_untrusted

    load_untrusted(path)  # external data confined to the model's folder, checker passes
    input_name, shape = _static_input_shape(path, args.batch)
    calib = _load_calib(args.calib_data, input_name, shape) if args.calib_data else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as tmp:
        for name in names:
            target = open_target(name, args.threads, args.runs, args.npu_cpu_fallback, args.htp_fp16)
            target.require_available()
            target.check_source(path, shown_as=path.name)
            model, note = _model_for(target, path, calib, Path(tmp), fp16=args.htp_fp16 and name == "npu-qnn-htp")
            try:
                report = target.profile_model(model, shape[1:], batch=args.batch)
            finally:
                target.close()
            rows.append({**report, "describe": target.describe(), "model": str(path), "built_with": note})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    console = _stdout_console()
    table = Table(title=f"{path.name}, batch {args.batch}")
    for col in ("target", "kind", "p50 ms", "p90 ms", "p99 ms", "throughput/s", "session ms", "first ms",
                "peak RSS MiB", "size KiB", "NPU nodes"):
        table.add_column(col, justify="left" if col in ("target", "kind") else "right")
    for r in rows:
        s, cov = r["latency"], r["npu_coverage"]
        table.add_row(r["target"], s["kind"], f"{s['p50_ms']:.4f}", f"{s['p90_ms']:.4f}", f"{s['p99_ms']:.4f}",
                      f"{r['throughput_per_s']:.0f}", _num(r["session_ms"], ".1f"), _num(r["first_inference_ms"], ".2f"),
                      _num(r["peak_rss_bytes"] and r["peak_rss_bytes"] / 2**20, ".0f"), f"{r['size_bytes'] / 1024:.1f}",
                      "" if cov is None else f"{cov['npu_node_share'] * 100:.0f}% ({cov['nodes'] - cov['npu_nodes']} on CPU)")
    console.print(table)
    for r in rows:
        unit = "cycles" if r["top_ops"] and "cycles" in r["top_ops"][0] else "time"
        ops = ", ".join(f"{o['node']} {o['share'] * 100:.0f}%" for o in r["top_ops"][:5])
        console.print(f"{r['target']}: {r['describe']['runtime']}; top ops by {unit}: {ops or 'n/a'}"
                      + (f"; profiled: {r['built_with']}" if r["built_with"] else ""))
        if r["latency"]["kind"] == "simulated":
            x = r["latency"]["extra"]
            console.print(f"  simulated: {x['cycles_p50']:.4g} cycles p50 (spread {x['cycles_spread_pct']:.0f}% over "
                          f"{len(x['cycles_runs'])} runs), ms = cycles / assumed {x['assumed_clock_mhz']:.0f} MHz clock")
    return 0


def _load_calib(path_text: str, input_name: str, shape: tuple[int, ...]):
    """Calibration inputs for ``edgec profile`` (see :func:`edgec.compile.source.read_inputs`)."""
    from edgec.compile.source import read_inputs

    return read_inputs(Path(path_text), input_name, shape, "calibration data", 256)


def _model_for(target, path: Path, calib, tmp: Path, fp16: bool = False) -> tuple[Path, str]:
    """The model to profile on ``target``: as given, or — for a target whose recipe fixes the batch and
    quantizes everything (the HTP) — built from a float model with that recipe, or (``fp16``) the float
    model with its batch fixed, run in fp16 on the HTP (``enable_htp_fp16_precision``)."""
    import numpy as np
    import onnx

    if not target.static_batch:
        return path, ""
    from edgec.compile.qnn import fix_batch

    model = onnx.load(str(path), load_external_data=False)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    static = dim0.HasField("dim_value") and dim0.dim_value > 0
    if any(n.op_type == "EPContext" for n in model.graph.node) or (
            static and any(n.op_type == "QuantizeLinear" for n in model.graph.node)):
        return path, ""  # built for the device already
    if fp16 or any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        out = tmp / f"{target.name}-batch1.onnx"
        onnx.save(fix_batch(onnx.load(str(path))), str(out))
        return out, ("the float model with batch 1, run in fp16 on the HTP (enable_htp_fp16_precision = 1, "
                     "QNN soc_model 57)" if fp16 else "the given QDQ model with its batch fixed to 1 "
                     "(it was quantized for another runtime; edgec's HTP recipe quantizes float models)")
    from edgec.compile.export import layer_nodes
    from edgec.compile.recipes import build

    if calib is None:
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        calib = np.random.default_rng(0).random((256, *shape), dtype=np.float32)
        note = f"built with recipe {target.recipe}, calibrated on random inputs (cost only; pass --calib-data for accuracy)"
    else:
        note = f"built with recipe {target.recipe}, calibrated on {len(calib)} inputs from --calib-data"
    out = tmp / f"{target.name}.onnx"
    build(target.recipe, path, out, tuple(layer_nodes(model)), calib)
    return out, note


def _stdout_console():
    """A console for tables: off a terminal (logs, pipes) wide enough that ids and numbers aren't cut."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _static_input_shape(path: Path, batch: int) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of the model's one input with the batch dimension set; other dynamic dims, and
    models with several inputs, are an error."""
    import onnx

    from edgec.errors import ModelError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"{path} is not a readable ONNX model", str(e).splitlines()[0] if str(e) else
                         type(e).__name__, "pass a valid .onnx file") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} graph inputs", "edgec profile feeds single-input models",
                         "pass a model with one input tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for k, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(d.dim_value if k else batch)
        elif k == 0:
            shape.append(batch)
        else:
            raise ModelError(f"input {inputs[0].name!r} of {path} has a dynamic dimension {k} ({d.dim_param!r})",
                             "edgec profile needs static shapes besides the batch", "export with a fixed shape")
    return inputs[0].name, tuple(shape)


def cmd_targets(args: argparse.Namespace) -> int:
    from rich.table import Table

    from edgec.targets import get_target, target_names

    rows = []
    for name in target_names():
        t = get_target(name)
        ok, why = t.availability()
        info = t.describe()
        rows.append({"name": name, "available": ok, "why_not": why, "recipe": t.recipe,
                     "latency_kind": t.latency_kind, **info})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="edgec targets")
    for col in ("name", "available", "runtime", "device", "recipe", "latency kind"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], "yes" if r["available"] else f"no: {r['why_not']}", r.get("runtime", ""),
                      r.get("device", ""), r["recipe"], r["latency_kind"])
    _stdout_console().print(table)
    return 0


class _RichProgress:
    """Progress on stderr: live bars on a terminal, otherwise (logs, CI) a plain line per ~10% step, or per
    :data:`UNBOUNDED_LOG_EVERY` steps of a stage with no known length."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.live = console.is_terminal
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                             disable=not self.live)
        self._task = None
        self._name, self._last_decile = "", -1

    def __enter__(self):
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._bar.stop()

    def stage(self, name: str, total: int | None = None) -> None:
        self._task = self._bar.add_task(name, total=total, note="")
        self._name, self._last_decile = name, -1
        if not self.live:
            self.console.print(f"{name} …", soft_wrap=True)  # one line per event in a log, never wrapped

    def advance(self, done: int, total: int | None = None, note: str = "") -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=done, total=total, note=note)
        if not self.live and total:
            decile = 10 * done // total
            if decile != self._last_decile:
                self._last_decile = decile
                self.console.print(f"  {self._name}: {done}/{total} {note}", soft_wrap=True)
        elif not self.live and done % UNBOUNDED_LOG_EVERY == 0:  # no total (PAGCP's trials): every so often
            self.console.print(f"  {self._name}: {done} {note}", soft_wrap=True)

    def log(self, text: str) -> None:
        self.console.print(text)


def _num(value, spec: str) -> str:
    """``value`` formatted, or "-" where the target has no such figure (a predicted latency has no session)."""
    return "-" if value is None else format(value, spec)


def _print_summary(result, console) -> None:
    from rich.table import Table

    targets = list(dict.fromkeys(a.target for a in result.artifacts))
    table = Table(title="edgec compile — published artifacts")
    onnx_input = "source_model" in result.report
    quality = ["fidelity %"] if onnx_input else ["val acc %", "test acc %"]
    cols = (["target"] if len(targets) > 1 else []) + ["id", "role", *quality, "p50 µs", "kind",
                                                       "vs ref", "size KiB", "INT8 layers"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("target", "id", "role", "kind") else "right")
    for name in targets:
        arts = [a for a in result.artifacts if a.target == name]
        # ratios only within one target, to the reference's p50 there (published or kept back by its gate)
        ref_p50_ms = result.report["latency_by_target"][name][result.reference.candidate_id]["p50_ms"]
        for a in arts:
            accuracy = [f"{a.val_accuracy * 100:.2f}"] + ([] if onnx_input else [f"{a.test_accuracy * 100:.2f}"])
            table.add_row(*([name] if len(targets) > 1 else []), a.id, a.role + (" ★" if a.chosen else ""),
                          *accuracy, f"{a.p50_ms * 1e3:.1f}",
                          a.latency_kind, f"{ref_p50_ms / a.p50_ms:.2f}×", f"{a.size_bytes / 1024:.1f}",
                          f"{sum(p == 'int8' for p in a.policy.values())}/{len(a.policy)}")
    console.print(table)
    for b in result.report.get("publication_gate", {}).get("blocked", []):
        console.print(f"[red]NOT published[/red] {b['target']} / {b['id']} ({b['role']}): {b['why']}")
    if onnx_input:
        console.print(f"Quality is {result.report['quality']} on {result.report['dataset']['name']}.")
    console.print(f"{len(result.evaluations) + 1} candidates evaluated on {targets[0]}. "
                  f"Outputs: {result.out}/report.html, report.json, manifest.json, candidates.csv")
    pruning = result.report.get("pruning")
    if pruning:
        from edgec.report import speed_text

        drop = pruning["drops_test"]["classification"]
        console.print(f"Pruned the chosen subnet {pruning['candidate_id']} (FP32, PAGCP): "
                      f"{pruning['flops_reduction'] * 100:.1f}% of FLOPs removed, test accuracy {drop:.2f} points "
                      f"lost, cpu-ort p50 {speed_text(pruning['speedup_p50_fp32'])}"
                      + ("" if pruning["within_max_accuracy_drop"] else " — beyond --max-accuracy-drop, so "
                         "pruned/manifest.json keeps the unpruned subnet chosen")
                      + f"; outputs in {result.out}/pruned/")


if __name__ == "__main__":
    sys.exit(main())
