"""Verified atomic checkpoints with keep-last-k, resumed from the newest intact one, and never
unpickling code.

A checkpoint is a directory `checkpoints/step-000120/` holding:
- what `accelerator.save_state` writes: model weights (safetensors), optimizer state (torch.save
  of tensors; DeepSpeed's *.pt under ZeRO), every rank's RNG states (torch.save of tensors and
  numpy arrays);
- `train_state.safetensors` + `train_state.json`: the loop's own state (EMA weights, data sampler
  position, LR schedule), written by `save_states` in formats that cannot carry code;
- `meta.json` (step, loss) and last `manifest.json`: the SHA-256 and size of every other file.

It is written under a temporary name, every file hashed and fsynced, and renamed into place only
when complete; it is verified again in place before `checkpoints/latest` names it and before any
older checkpoint is rotated away, so the last good checkpoint is never deleted first. Weights
that are not finite are never saved.

Resuming (`resume`) takes the newest checkpoint whose files all match its manifest and whose
torch.save files reference nothing outside a weights-only allowlist (tensors, numpy arrays, the
few DeepSpeed types named in SAFE_GLOBALS); a damaged one is reported with the file and skipped for
the one before. Its torch.save files are then loaded with torch's weights-only unpickler forced on
(TORCH_FORCE_WEIGHTS_ONLY_LOAD), including where accelerate or DeepSpeed ask for a full unpickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train.faults import RunError

LATEST = "latest"
MANIFEST = "manifest.json"
STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"
PICKLED = (".bin", ".pt", ".pth", ".pkl")  # what accelerate and DeepSpeed write with torch.save
# Tests only: seconds to sleep once a checkpoint's files and manifest are written, before it is
# renamed into place (the window a kill during a checkpoint write falls in).
PAUSE_BEFORE_PUBLISH = "MINISTACK_TEST_CHECKPOINT_PAUSE_S"


class CheckpointError(RunError):
    """A checkpoint could not be written, or none could be resumed from: the message says which path."""


def _safe_globals() -> list:
    """The non-torch types the torch.save files of a checkpoint may hold, for the weights-only
    unpickler: numpy arrays and dtypes (accelerate's RNG states: the list accelerate itself
    passes to torch.load) and, under DeepSpeed, the config enums and loss-scaler state of its
    ZeRO files. Nothing here runs code when unpickled: each rebuilds plain data."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = list(TORCH_SAFE_GLOBALS)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, fragment_address]
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside runs the weights-only unpickler (even a call passing
    weights_only=False, as DeepSpeed's checkpoint engine does), with SAFE_GLOBALS allowed."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save(
    accelerator, root: str | Path, step: int, meta: dict, keep: int = 3, states: dict | None = None, model=None
) -> Path:
    """Save the full training state at `step`; all ranks call this (ZeRO shards save per rank).

    `states`: the loop's own stateful objects by name (state_dict / load_state_dict), saved by
    `save_states`. `model`: checked finite first. Raises CheckpointError when the weights are not
    finite or a write fails (a full disk): the last good checkpoint is then left as it was."""
    root, states = Path(root), states or {}
    final, tmp = _step_dir(root, step), root / f".tmp-step-{step:07d}"
    _refuse_nonfinite(accelerator, step, model, states)
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_states(tmp, states)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
            _write_manifest(tmp)
            if pause := float(os.environ.get(PAUSE_BEFORE_PUBLISH, "0")):
                time.sleep(pause)
            _publish(root, tmp, final, keep)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / LATEST
        good = root / pointer.read_text().strip() if pointer.is_file() else "none yet"
        raise CheckpointError(
            f"writing the checkpoint of step {step} to {tmp} failed: {err}. The last good checkpoint "
            f"({good}) is untouched; free space (or fix {root}) and run again to resume "
            f"from it"
        ) from None
    accelerator.wait_for_everyone()
    return final


def _refuse_nonfinite(accelerator, step: int, model, states: dict) -> None:
    """Raise CheckpointError on every rank if any rank holds a non-finite weight (its own ZeRO
    partition where parameters are sharded) or a non-finite saved state tensor (the EMA)."""
    named = []
    if model is not None:
        named += [(n, getattr(p, "ds_tensor", p)) for n, p in accelerator.unwrap_model(model).named_parameters()]
    for name, obj in states.items():
        flat: dict[str, torch.Tensor] = {}
        _flatten(obj.state_dict(), name, flat)
        named += flat.items()
    bad = next((n for n, t in named if t.is_floating_point() and not torch.isfinite(t).all()), None)
    flag = torch.tensor([float(bad is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    if flag.item():
        raise CheckpointError(
            f"refusing to save the checkpoint of step {step}: non-finite weights "
            f"({bad or 'on another rank'}); the last good checkpoint stays the newest"
        )


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename `tmp` into place, verify it there, then point `latest` at it and rotate old ones."""
    stale = root / f".old-{final.name}"
    if final.exists():  # the same step saved again (a resumed run redoing it): replaced only once verified
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    _fsync_dir(root)
    if problem := verify(final):
        raise OSError(f"the checkpoint does not read back as written: {problem}")
    shutil.rmtree(stale, ignore_errors=True)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    for old in sorted(root.glob("step-*"))[:-keep] + sorted(root.glob(".tmp-step-*")):
        shutil.rmtree(old, ignore_errors=True)


def _hash(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(path: Path) -> None:
    """SHA-256 and size of every file under `path`, each fsynced first, then the manifest itself."""
    files = {
        rel: {"sha256": _hash(path / rel, sync=True), "bytes": (path / rel).stat().st_size} for rel in _files(path)
    }
    with open(path / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> str | None:
    """None when checkpoint `path` is intact and safe to load; else what is wrong, naming the file:
    no manifest, a file missing, added, truncated or changed, or a torch.save file that references
    a global outside the weights-only allowlist (a crafted pickle: it is never loaded)."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path / MANIFEST}: missing or unreadable ({err}): an incomplete checkpoint"
    added = sorted(set(_files(path)) - set(files))
    if added:
        return f"{path / added[0]}: not in the manifest (a file added after the checkpoint was written)"
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            return f"{file}: missing"
        if (size := file.stat().st_size) != entry["bytes"]:
            return f"{file}: {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
        if _hash(file) != entry["sha256"]:
            return f"{file}: SHA-256 does not match the manifest (damaged)"
    with torch.serialization.safe_globals(_safe_globals()):
        for rel in files:
            if rel.endswith(PICKLED):
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path / rel)
                except Exception as err:  # noqa: BLE001  (anything unreadable is refused, whatever the reason)
                    return f"{path / rel}: not a torch.save archive ({type(err).__name__}: {err}); not loaded"
                if unsafe:
                    return f"{path / rel}: references {sorted(unsafe)}, outside the weights-only allowlist; not loaded"
    return None


def _newest_intact(root: Path, log) -> Path | None:
    """The newest checkpoint under `root` that `verify` accepts (each rejected one reported through
    `log`); None when there are none. Raises CheckpointError when there are some but none is intact:
    starting afresh would rotate them away, so that is left to the user."""
    candidates = sorted(root.glob("step-*"), reverse=True)
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is not usable: {problem}; trying the one before")
    if candidates:
        raise CheckpointError(
            f"no intact checkpoint under {root} ({len(candidates)} rejected, each named above): "
            f"move {root} aside to start the run afresh"
        )
    return None


def latest(root: str | Path) -> Path | None:
    """The newest intact checkpoint under `root`, or None (CheckpointError: only damaged ones)."""
    return _newest_intact(Path(root), log=lambda _: None)


def resume(accelerator, root: str | Path, states: dict | None = None) -> tuple[Path | None, dict]:
    """Restore the newest intact checkpoint under `root` (chosen by the main process, the choice
    broadcast) into the accelerator's objects and `states`; (its path, its meta), or (None, {})."""
    from accelerate.utils import broadcast_object_list

    choice = [None]
    if accelerator.is_main_process:
        found = _newest_intact(Path(root), log=accelerator.print)
        choice = [None if found is None else str(found)]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if choice[0] is None:
        return None, {}
    path = Path(choice[0])
    try:
        with weights_only_loads():
            accelerator.load_state(str(path))
        load_states(path, states or {})
        meta = json.loads((path / "meta.json").read_text())
    except Exception as err:  # noqa: BLE001  (whatever the loader raises, the run must not start from a half-load)
        raise CheckpointError(f"resuming from {path} failed: {type(err).__name__}: {err}") from None
    return path, meta


def save_states(path: Path, states: dict) -> None:
    """The loop's stateful objects (EMA, sampler, schedule) as safetensors (their tensors) and JSON
    (the rest): neither format can carry code, so loading them back runs none."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {name: _flatten(obj.state_dict(), name, tensors) for name, obj in states.items()}
    save_file(tensors, str(path / STATE_TENSORS))
    (path / STATE_JSON).write_text(json.dumps(tree))


def load_states(path: Path, states: dict) -> None:
    """Restore `states` from `save_states`' files; a name missing there is a KeyError."""
    if not states:
        return
    tensors = load_file(str(path / STATE_TENSORS))
    tree = json.loads((path / STATE_JSON).read_text())
    for name, obj in states.items():
        obj.load_state_dict(_unflatten(tree[name], tensors))


def _flatten(tree, key: str, tensors: dict):
    """`tree` with each tensor moved into `tensors` under its path and replaced by {"tensor": path}."""
    if isinstance(tree, torch.Tensor):
        tensors[key] = tree.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(tree, dict):
        return {"dict": {str(k): _flatten(v, f"{key}/{k}", tensors) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {"list": [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise TypeError(f"{key}: a {type(tree).__name__} cannot be checkpointed as data")


def _unflatten(node, tensors: dict):
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if kind == "list":
        return [_unflatten(v, tensors) for v in value]
    return value
