"""The project's own Python files, for the tests that read its source rather than run it."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "train", "serve", "profiling", "scaling")


def source_files(skip: tuple[str, ...] = ()) -> list[Path]:
    """Every .py file under the repository root, leaving out hidden directories (.git, .venv),
    caches, virtual environments and the top-level directories named in `skip`."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and d != "__pycache__"
            and not (here / d / "pyvenv.cfg").exists()
            and not (here == ROOT and d in skip)
        )
        files += [here / name for name in sorted(names) if name.endswith(".py")]
    return files


def module_name(path: Path) -> str:
    """'train/data/loader.py' -> 'train.data.loader'; a package's __init__.py is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
