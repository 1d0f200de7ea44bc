"""Named DiT configurations, and loading one from a name or a YAML file.

- `dit-{s,b,l,xl}-{2,4,8}`: the DiT paper's class-conditional ImageNet-256 models (latent
  32x32x4 from the SD VAE, 1000 classes, learned sigma). Same parameter counts and forward
  compute as the paper's Table 4 (whose "Gflops" are multiply-adds: half our FLOPs).
- `tiny`, `small`: text-conditional video configs sized for a 2-core CPU.
- `video-b`, `video-l`: text-conditional video configs for a GPU.
Text-conditional presets use all-MiniLM-L6-v2's 384-wide token states (the default encoder).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from model.dit import DiTConfig

_PAPER_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}

PRESETS: dict[str, DiTConfig] = {
    f"dit-{size}-{p}": DiTConfig(
        in_channels=4,
        patch_size=(1, p, p),
        hidden_size=d,
        depth=depth,
        num_heads=heads,
        num_classes=1000,
        learn_sigma=True,
    )
    for size, (d, depth, heads) in _PAPER_SIZES.items()
    for p in (2, 4, 8)
}
PRESETS.update(
    tiny=DiTConfig(in_channels=4, patch_size=(1, 2, 2), hidden_size=192, depth=6, num_heads=3, text_dim=384),
    small=DiTConfig(in_channels=4, patch_size=(1, 2, 2), hidden_size=384, depth=12, num_heads=6, text_dim=384),
    **{
        "video-b": DiTConfig(
            in_channels=4, patch_size=(1, 2, 2), hidden_size=768, depth=12, num_heads=12, text_dim=384
        ),
        "video-l": DiTConfig(
            in_channels=4, patch_size=(1, 2, 2), hidden_size=1024, depth=24, num_heads=16, text_dim=384
        ),
    },
)


def load_config(name_or_path: str) -> DiTConfig:
    """A preset by name, or a YAML file whose `model:` mapping names a `preset` and/or sets fields."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown model config {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file")
    doc = yaml.safe_load(path.read_text()) or {}
    fields = dict(doc.get("model", doc))
    base = PRESETS[fields.pop("preset")] if "preset" in fields else DiTConfig()
    unknown = set(fields) - set(DiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown model fields {sorted(unknown)}")
    return replace(base, **fields)
