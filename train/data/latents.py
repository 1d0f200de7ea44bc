"""The latent cache: clips encoded once by the frozen codec and text encoder, stored as safetensors shards.
This module builds it; train.data.latent_cache reads it back.

Training on pixels runs both frozen encoders on every clip of every epoch; their outputs never
change, so the cache stage computes them once and the DiT stage reads them back. On a CPU the text
encoder alone costs more per clip than the tiny DiT's forward, so this is most of a small run's time.

    DIR/cache.json                       what was encoded with what (codec, text encoder, data, buckets),
                                         the shards, the files skipped and why, the source's fingerprint,
                                         the encoders' measured FLOPs
    DIR/source.json                      the fingerprint's files (path -> size, mtime_ns), written before
                                         the first shard: what a later start compares the source with
    DIR/F_H_W-00000.safetensors          per bucket, `shard_size` clips: latents [n, C, t, h, w],
                                         context [n, L, D], context_mask [n, L], index [n] (dataset index)
    DIR/F_H_W-00000.json                 their captions and sources (the sources seed the training noise,
                                         so a run on the cache draws exactly the noise a run on pixels does)
    DIR/null.safetensors                 the empty caption's embedding: the unconditional input that
                                         caption dropout swaps in (classifier-free guidance)

Every shard is written to a temporary name and renamed, and a shard already on disk is kept: a
cache stage killed part-way resumes where it stopped, and a half-written shard never exists.

Files skipped (unreadable, no caption, failed to decode, fitting no bucket) are said at build
time and each time the cache is reused, in the folder dataset's words, and kept in cache.json
(all counted by reason, the first SKIPPED_LISTED by name). A cache for another codec, text
encoder or data configuration is refused. A cache whose source changed after it was built (for
folder data: a media, caption or index file added, removed, or changed in size or mtime_ns; the
procedural and digits clips are pure functions of the configuration, so their fingerprint is the
configuration) is rebuilt, said with what changed: training on it would silently use the old data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from profiling.measure import count_flops
from train.data.buckets import Bucket, assign_bucket, fit_to_bucket, parse_bucket
from train.data.latent_cache import MANIFEST, NULL
from train.data.loader import make_dataset

SOURCE = "source.json"
SHARD = re.compile(r"\d+_\d+_\d+-\d{5}\.(safetensors|json)")  # the shards' file names (_bucket_name-k)
SKIPPED_LISTED = 100  # skipped files named in cache.json (all are counted, by reason)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _bucket_name(bucket: Bucket) -> str:
    return "_".join(map(str, bucket))


def cache_key(cfg) -> dict:
    """What the cached tensors depend on: a cache built for another codec, text encoder or data is refused."""
    return {
        "codec": cfg.codec,
        "text_encoder": cfg.text_encoder,
        "dtype": cfg.cache_dtype,
        "data": {
            k: v for k, v in asdict(cfg.data).items() if k not in ("batch_size", "bucket_batch_size", "num_workers")
        },
    }


def source_fingerprint(cfg) -> tuple[dict, dict[str, list[int]] | None]:
    """(summary, files) of what a cache of cfg's data was read from. For folder data, files maps
    each media, caption and index file (VideoFolder.source_files, relative to the source's folder)
    to [size, mtime_ns], and the summary holds their digest and counts; nothing is opened. Other
    kinds are pure functions of their configuration: the digest is the configuration's, files None.
    (A file rewritten within the file system's mtime resolution at the same size goes unnoticed.)"""
    data = cfg.data
    if data.kind != "folder":
        digest = hashlib.sha256(json.dumps(cache_key(cfg)["data"], sort_keys=True).encode()).hexdigest()
        return {"kind": data.kind, "of": "config", "digest": digest}, None
    from train.data.folder import VideoFolder

    if not data.source:
        raise ValueError("data.kind=folder needs data.source: a folder, CSV or JSONL of (path, caption)")

    files = {}
    for name, path in VideoFolder(data.source, scan=False).source_files().items():
        with contextlib.suppress(OSError):  # gone since it was listed: not part of the source
            st = path.stat()
            files[name] = [st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(
        "".join(f"{name}\0{size}\0{mtime}\n" for name, (size, mtime) in sorted(files.items())).encode()
    )
    return {
        "kind": "folder",
        "of": "files",
        "digest": digest.hexdigest(),
        "files": len(files),
        "bytes": sum(size for size, _ in files.values()),
        "exists": Path(data.source).exists(),
    }, files


def source_changes(recorded: dict | None, files: dict) -> str:
    """'N files added, M removed, K modified' from the recorded files to `files`."""
    if recorded is None:  # source.json lost: that it changed is known, not how
        return "the source changed"
    added = len(files.keys() - recorded.keys())
    removed = len(recorded.keys() - files.keys())
    modified = sum(1 for name in files.keys() & recorded.keys() if list(files[name]) != list(recorded[name]))
    return f"{added} file{'s' if added != 1 else ''} added, {removed} removed, {modified} modified"


def _clear(directory: Path) -> None:
    """Remove a cache's own files (manifest first: a clear cut short leaves a partial build, never a
    manifest naming missing shards); anything else in the directory is left alone."""
    for name in (MANIFEST, NULL, SOURCE):
        (directory / name).unlink(missing_ok=True)
    for path in directory.iterdir():
        if SHARD.fullmatch(path.name):
            path.unlink()


def _plan(dataset, buckets: list[Bucket], shard_size: int) -> tuple[dict[Bucket, list[list[int]]], list[int]]:
    """Per bucket, the dataset indices of each shard, a pure function of the dataset (so a resumed
    build recomputes exactly the shards that are missing); and the indices that fit no bucket."""
    members: dict[Bucket, list[int]] = {b: [] for b in buckets}
    unfit = []
    for i in range(len(dataset)):
        bucket = assign_bucket(tuple(dataset.size_of(i)), buckets)
        if bucket is None:
            unfit.append(i)
        else:
            members[bucket].append(i)
    return {
        b: [idx[s : s + shard_size] for s in range(0, len(idx), shard_size)] for b, idx in members.items() if idx
    }, unfit


def _skipped_files(dataset, failed: list[tuple[str, str]], unfit: list[int]) -> tuple[list[dict], str | None]:
    """Every file or clip the cache left out, as {"path", "reason", "detail"}, and for folder data
    its report() line (the wording `data:` uses on pixels) with the cache's own drops added."""
    name = getattr(dataset, "name_of", lambda i: f"index {i}")
    dropped = [(name(i), "x".join(map(str, dataset.size_of(i)))) for i in unfit]
    entries = [
        {"path": path, "reason": reason, "detail": detail}
        for reason, items in sorted(getattr(dataset, "skipped", {}).items())
        for path, detail in items
    ]
    entries += [{"path": path, "reason": "failed to decode", "detail": detail} for path, detail in failed]
    entries += [{"path": path, "reason": "without a bucket", "detail": detail} for path, detail in dropped]
    if not hasattr(dataset, "report"):
        return entries, None
    dataset.failed = list(failed)  # this build's failures and those of the shards an earlier one wrote
    return entries, dataset.report(dropped={"without a bucket": dropped})


@dataclass
class Shard:
    """What one shard adds to the manifest, whether this build wrote it or an earlier one did."""

    clips: int
    failed: list[tuple[str, str]]  # (file, why) of its clips that failed to decode
    frozen_flops: int  # the encoders' FLOPs on its clips


class FrozenEncoders:
    """The run's frozen codec and text encoder over a shard's clips, in batches, their FLOPs
    counted as they run."""

    def __init__(self, codec, text_encoder, batch_size: int, store: torch.dtype) -> None:
        self.codec, self.text_encoder, self.batch_size, self.store = codec, text_encoder, batch_size, store
        self.flops = 0

    def encode(self, clips: list) -> dict[str, torch.Tensor]:
        """latents (and context, context_mask) of `clips`: floats in the cache's dtype, masks as uint8."""
        parts = [self._batch(clips[s : s + self.batch_size]) for s in range(0, len(clips), self.batch_size)]
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return {k: v.to(self.store) if v.is_floating_point() else v.to(torch.uint8) for k, v in tensors.items()}

    def _batch(self, clips: list) -> dict[str, torch.Tensor]:
        video = torch.stack([c.video for c in clips])
        out: dict[str, torch.Tensor] = {}

        def run() -> None:
            out["latents"] = self.codec.encode(video)
            if self.text_encoder is not None:
                out["context"], out["context_mask"] = self.text_encoder(
                    [c.caption for c in clips], pad_to_max_length=True
                )

        self.flops += count_flops(run).total  # counting runs the encoders: their real FLOPs, once per clip
        return out


def _reusable(cfg, directory: Path, key: dict, fingerprint: dict, files: dict | None, log) -> dict | None:
    """The manifest of a cache in `directory` to use as it is: of this configuration and source, or
    of a source that no longer exists. Otherwise None, the directory ready to build in: a stale
    cache or a partial build of another source cleared, a partial build of this one kept to resume.
    A cache or partial build of another configuration is refused."""

    def recorded() -> dict | None:  # what source.json holds (read only when needed: one entry per file)
        return json.loads((directory / SOURCE).read_text()) if (directory / SOURCE).is_file() else None

    if (directory / MANIFEST).is_file():
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest["key"] != key:
            raise ValueError(
                f"{directory} caches {manifest['key']}, not this run's {key}: use another latent_cache directory"
            )
        built_from = manifest.get("source")
        if fingerprint["of"] == "config" and built_from is None:
            built_from = (
                fingerprint  # a cache from before fingerprints: the key above already matched the configuration
            )
        if built_from is not None and built_from["digest"] == fingerprint["digest"]:
            if manifest.get("data_report"):
                log(f"data: {manifest['data_report']} (as when the cache was built)")
            return manifest
        if files is not None and not fingerprint["exists"]:  # the data moved away: the cache is all that is left of it
            log(
                f"cache: {directory}: its source {cfg.data.source} no longer exists: using the cache as built "
                f"({manifest['clips']} clips)"
            )
            return manifest
        if built_from is None:
            log(
                f"cache: {directory}: it records no fingerprint of its source (built before fingerprints were "
                "recorded), so it may be stale: rebuilding"
            )
        else:
            log(
                f"cache: {directory}: {source_changes((recorded() or {}).get('files'), files or {})} since the cache "
                "was built: rebuilding"
            )
        _clear(directory)
    elif (partial := recorded()) is not None:  # a partial build: resumable only if of this configuration and source
        if partial["key"] != key:
            raise ValueError(
                f"{directory} holds a partial cache of {partial['key']}, not this run's {key}: "
                "use another latent_cache directory"
            )
        if partial["source"]["digest"] != fingerprint["digest"]:
            log(
                f"cache: {directory}: {source_changes(partial.get('files'), files or {})} since the partial build "
                "started: starting over"
            )
            _clear(directory)
    elif files is not None and directory.is_dir() and any(SHARD.fullmatch(p.name) for p in directory.iterdir()):
        log(f"cache: {directory}: a partial build records no fingerprint of its source: starting over")
        _clear(directory)
    return None


def _written_shard(directory: Path, name: str, name_of) -> Shard | None:
    """The shard `name` as an earlier build completed it; None where it is not on disk."""
    path = directory / f"{name}.json"
    if not path.is_file():  # written last: with it, the shard is complete
        return None
    meta = json.loads(path.read_text())
    failed = [tuple(f) for f in meta.get("failed", [(name_of(i), "") for i in meta["skipped"]])]
    return Shard(len(meta["captions"]), failed, meta["frozen_flops"])


def _write_shard(
    directory: Path, name: str, dataset, bucket: Bucket, indices: list[int], encoders: FrozenEncoders
) -> Shard:
    """Encode the clips of `indices`, fitted to `bucket`, into the shard `name`: its tensors, then
    its captions and sources. A clip that fails to decode is left out, with why."""
    name_of = getattr(dataset, "name_of", lambda i: f"index {i}")
    clips, kept, missing, why = [], [], [], []
    for i in indices:
        seen = len(getattr(dataset, "failed", ()))
        clip = dataset[i]
        if clip is None:  # a file that failed to decode: the folder dataset recorded why in `failed`
            missing.append(i)
            new = getattr(dataset, "failed", ())[seen:]
            why.append((name_of(i), new[-1][1] if new else ""))
            continue
        clips.append(fit_to_bucket(clip, bucket))
        kept.append(i)
    before = encoders.flops
    tensors = encoders.encode(clips)
    tensors["index"] = torch.tensor(kept, dtype=torch.int64)
    _atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    meta = {
        "captions": [c.caption for c in clips],
        "sources": [c.source for c in clips],
        "skipped": missing,
        "failed": why,
        "frozen_flops": encoders.flops - before,
    }
    _atomic_write(directory / f"{name}.json", lambda p: p.write_text(json.dumps(meta)))
    return Shard(len(clips), why, meta["frozen_flops"])


@torch.no_grad()
def build_cache(
    cfg, directory: str | Path, codec, text_encoder, batch_size: int = 32, shard_size: int = 256, log=print
) -> dict:
    """Encode cfg's data with cfg's codec and text encoder (loaded by the caller, as the run's
    own) into `directory` in cfg.cache_dtype; returns the manifest. Resumes a partial build;
    refuses a directory cached for a different configuration."""
    directory = Path(directory)
    key = cache_key(cfg)
    fingerprint, files = source_fingerprint(cfg)  # before the data is read: a change during the build shows next time
    if (manifest := _reusable(cfg, directory, key, fingerprint, files, log)) is not None:
        return manifest
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp*"):  # a build killed mid-write
        stale.unlink()
    _atomic_write(
        directory / SOURCE, lambda p: p.write_text(json.dumps({"key": key, "source": fingerprint, "files": files}))
    )
    dataset = make_dataset(cfg.data)
    buckets = sorted({parse_bucket(b) for b in cfg.data.buckets})
    store = DTYPES[cfg.cache_dtype]
    encoders = FrozenEncoders(codec, text_encoder, batch_size, store)
    name_of = getattr(dataset, "name_of", lambda i: f"index {i}")
    frozen_flops, failed, shards = 0, [], []
    plan, unfit = _plan(dataset, buckets, shard_size)
    for bucket, shard_lists in plan.items():
        for k, indices in enumerate(shard_lists):
            name = f"{_bucket_name(bucket)}-{k:05d}"
            written = _written_shard(directory, name, name_of)
            shard = written or _write_shard(directory, name, dataset, bucket, indices, encoders)
            shards.append({"file": f"{name}.safetensors", "bucket": list(bucket), "count": shard.clips})
            frozen_flops, failed = frozen_flops + shard.frozen_flops, failed + shard.failed
            if written is None:
                log(f"cache: {name}: {shard.clips} clips ({sum(s['count'] for s in shards)} so far)")
    if text_encoder is not None:
        context, mask = text_encoder([""], pad_to_max_length=True)
        _atomic_write(
            directory / NULL,
            lambda p: save_file({"context": context[0].to(store), "context_mask": mask[0].to(torch.uint8)}, str(p)),
        )
    entries, report = _skipped_files(dataset, failed, unfit)
    reasons: dict[str, int] = {}
    for entry in entries:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    manifest = {
        "key": key,
        "dtype": cfg.cache_dtype,
        "latent_channels": codec.latent_channels,
        "buckets": [list(b) for b in buckets],
        "shards": shards,
        "clips": sum(s["count"] for s in shards),
        "skipped": len(entries),
        "skipped_files": {"total": len(entries), "by_reason": reasons, "listed": entries[:SKIPPED_LISTED]},
        "data_report": report,
        "source": fingerprint,
        "frozen_flops": frozen_flops,
        "text": text_encoder is not None,
    }
    _atomic_write(directory / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    if report:
        log(f"data: {report}")
    return manifest


def build_cache_for(cfg) -> dict:
    """The cache stage on its own (`ministack train cache`): load the run's frozen encoders, build cfg.latent_cache."""
    from model.configs import load_config
    from model.text_encoder import TextEncoder
    from model.vae import load_codec

    text_encoder = TextEncoder(cfg.text_encoder) if load_config(cfg.model).text_dim else None
    return build_cache(cfg, cfg.latent_cache, load_codec(cfg.codec), text_encoder)
