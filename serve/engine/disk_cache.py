"""The prefix cache's disk tier: full KV blocks kept as files, so a long document sent again
(after its blocks were evicted from memory, or after a restart) is loaded instead of prefilled.

Every block the engine fills and names (BlockManager.commit) is written through to disk by a
background thread, one safetensors file per block: its K and V over every layer (and an int8
cache's scales), named by a SHA-256 chain over the block's token ids and every block before it
(Python's `hash`, which names blocks in memory, is not stable across processes), with the
model's fingerprint, the token ids and a checksum of the tensors in the file's metadata. Files
are written to a temporary name and renamed (atomic); the directory is capped in bytes, least
recently used files deleted first. A new request's leading blocks beyond the memory hits are
looked up here (`load_prefix`) and copied into free cache blocks, which the scheduler then
finds as ordinary prefix hits. A file that does not verify (another model, another KV layout,
truncated, bit-flipped, token ids that differ) is deleted, counted, and never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


def chain_keys(token_ids: list[int], block_size: int, start: int, stop: int, parent: str) -> list[str]:
    """Hex keys of full blocks start..stop-1: key_i = sha256(key_{i-1}, block i's ids), where
    key_{start-1} is `parent` (the salt before the first block)."""
    keys, parent = [], parent.encode()
    for i in range(start, stop):
        digest = hashlib.sha256(parent)
        digest.update(json.dumps(token_ids[i * block_size : (i + 1) * block_size]).encode())
        parent = digest.hexdigest().encode()
        keys.append(parent.decode())
    return keys


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiskCache:
    """Block files under `directory`, at most `max_bytes` of them, for the model `fingerprint`."""

    def __init__(self, directory: str | Path, max_bytes: int, fingerprint: str, block_size: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the disk cache's size must be > 0 bytes, got {max_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.fingerprint, self.block_size = max_bytes, fingerprint, block_size
        self.salt = hashlib.sha256(fingerprint.encode()).hexdigest()
        self._lock = threading.Lock()
        # key -> file size, least recently used first; what is on disk from earlier runs too
        self._index: OrderedDict[str, int] = OrderedDict()
        for path in sorted(self.dir.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            self._index[path.name.removesuffix(SUFFIX)] = path.stat().st_size
        for tmp in self.dir.glob("*.tmp"):  # a write cut short by a crash
            tmp.unlink(missing_ok=True)
        self.bytes = sum(self._index.values())
        self.hits = 0  # blocks loaded
        self.rejected = 0  # files that failed verification (deleted)
        self.dropped = 0  # blocks not written because the writer was 256 blocks behind
        self._queue: queue.Queue[tuple[str, list[int], dict[str, torch.Tensor]]] = queue.Queue(maxsize=256)
        self._writer = threading.Thread(target=self._write_loop, name="kv-disk-writer", daemon=True)
        self._writer.start()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def extend_keys(self, keys: list[str], token_ids: list[int], blocks: int, root: str | None = None) -> None:
        """Grow `keys` (a sequence's chain so far) to its first `blocks` full blocks; `root` (its
        cache_root) salts the chain beside the model's fingerprint."""
        if len(keys) < blocks:
            keys += chain_keys(
                token_ids,
                self.block_size,
                len(keys),
                blocks,
                keys[-1] if keys else self.salt + (f"/{root}" if root else ""),
            )

    def store(self, key: str, token_ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Queue one block's tensors (copies, CPU) for writing; dropped if the writer is behind."""
        if key in self:
            return
        try:
            self._queue.put_nowait((key, list(token_ids), tensors))
        except queue.Full:  # best effort, bounded memory: the block stays in memory regardless
            self.dropped += 1

    def load(self, key: str, token_ids: list[int]) -> dict[str, torch.Tensor] | None:
        """The block's tensors, verified, or None (missing; or rejected and deleted)."""
        path = self.dir / f"{key}{SUFFIX}"
        try:  # one read: the header's metadata and the tensors
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            self._forget(key)
            return None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is rejected
            return self._reject(key, f"unreadable ({type(exc).__name__})")
        if meta.get("fingerprint") != self.fingerprint:
            return self._reject(key, "another model or KV layout")
        if json.loads(meta.get("token_ids", "null")) != list(token_ids):
            return self._reject(key, "other token ids")
        if meta.get("checksum") != _checksum(tensors):
            return self._reject(key, "checksum mismatch")
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        self.hits += 1
        return tensors

    def flush(self) -> None:
        """Wait until every queued block is written."""
        self._queue.join()

    def _reject(self, key: str, why: str) -> None:
        log.warning("KV disk cache: ignoring block file %s: %s", key[:16], why)
        self.rejected += 1
        (self.dir / f"{key}{SUFFIX}").unlink(missing_ok=True)
        self._forget(key)
        return None

    def _forget(self, key: str) -> None:
        with self._lock:
            self.bytes -= self._index.pop(key, 0)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._write(*item)
            except Exception:  # noqa: BLE001 - a failed write loses a cache entry, never a request
                log.exception("KV disk cache: a block write failed")
            finally:
                self._queue.task_done()

    def _write(self, key: str, token_ids: list[int], tensors: dict[str, torch.Tensor]) -> None:
        path = self.dir / f"{key}{SUFFIX}"
        tmp = path.with_suffix(".tmp")
        meta = {"fingerprint": self.fingerprint, "token_ids": json.dumps(token_ids), "checksum": _checksum(tensors)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        size = path.stat().st_size
        with self._lock:
            self.bytes += size - self._index.pop(key, 0)
            self._index[key] = size
            while self.bytes > self.max_bytes and len(self._index) > 1:
                old, old_size = self._index.popitem(last=False)
                (self.dir / f"{old}{SUFFIX}").unlink(missing_ok=True)
                self.bytes -= old_size


def fingerprint(model_name: str, hf_config, kv_dtype: torch.dtype, block_size: int, model_dtype: torch.dtype) -> str:
    """What makes a block's K/V reusable: the model (name and config), the dtype it computed in,
    the cache's dtype and block size."""
    config = json.dumps(hf_config.to_dict(), sort_keys=True, default=str)
    return json.dumps(
        {
            "model": model_name,
            "config": hashlib.sha256(config.encode()).hexdigest(),
            "dtype": str(model_dtype),
            "kv_dtype": str(kv_dtype),
            "block_size": block_size,
        }
    )


class DiskTier:
    """The engine's glue to a DiskCache: writes committed blocks through, loads a new
    sequence's prefix. Runs on the engine's thread (the cache's writer thread does the IO)."""

    def __init__(self, cache: DiskCache, block_manager, runner) -> None:
        self.cache, self.bm, self.runner = cache, block_manager, runner

    def write_through(self, seq, first: int) -> None:
        """Queue seq's blocks `first`.. that commit just named (and that are not on disk yet)."""
        bs = self.bm.block_size
        self.cache.extend_keys(seq.disk_keys, seq.token_ids, len(seq.block_hashes), seq.cache_root)
        for i in range(first, len(seq.block_hashes)):
            if seq.block_table[i] >= 0 and seq.disk_keys[i] not in self.cache:
                self.cache.store(
                    seq.disk_keys[i], seq.token_ids[i * bs : (i + 1) * bs], self.runner.read_block(seq.block_table[i])
                )

    def load_prefix(self, seq) -> int:
        """Copy the blocks of seq's prefix that are on disk but not in memory into free cache
        blocks (named, so the scheduler takes them as prefix hits); returns the tokens loaded."""
        bs = self.bm.block_size
        hits = self.bm.cached_prefix(seq)
        usable = (seq.num_tokens - 1) // bs  # as cached_prefix: one token is always computed
        if seq.computes_prompt_logprobs or len(hits) >= usable:
            return 0
        self.cache.extend_keys(seq.disk_keys, seq.token_ids, usable, seq.cache_root)
        parent = self.bm.blocks[hits[-1]].hash if hits else seq.cache_root
        keep, loaded = set(hits), 0
        for i in range(len(hits), usable):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            tensors = self.cache.load(seq.disk_keys[i], tokens) if seq.disk_keys[i] in self.cache else None
            block_id = self.bm.adopt(parent, tokens, keep) if tensors is not None else None
            if block_id is None:
                break
            self.runner.write_block(block_id, tensors)
            keep.add(block_id)
            parent, loaded = self.bm.blocks[block_id].hash, loaded + 1
        seq.num_disk_tokens = loaded * bs
        return seq.num_disk_tokens
