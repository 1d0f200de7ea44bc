"""What one generated token costs as the context grows: measured FLOPs and time through the engine.

The laws charge a served token 2·N FLOPs whatever its context. Two things break that as the
context grows, and this module measures where each takes over for the serving model on this
machine:

- *FLOPs*: a decode's attention (QK^T and AV over every cached key: 4·layers·heads·head_dim
  FLOPs per key) grows linearly with the context while the weights' 2·N stays fixed. The
  crossover is where attention's FLOPs equal the weights'.
- *Time*: a decode reads every weight once per step (shared by the batch) and each sequence's
  whole K/V cache. On a machine where decode is memory-bound the step time grows with the K/V
  read; the turn is the context where the K/V term of a straight-line fit of TPOT against context
  equals the fixed term (and, from bytes alone, where the K/V bytes read equal the weights').

Each point runs `batch` prompts of `context` random tokens through the engine (chunked prefill,
timed: the batch's TTFT), counts the first decode step with the op counter
(`profiling.measure.count_flops`: the FLOPs the kernels ran, by part) and times the next
`decode_tokens` steps (TPOT: their median). The formula is `profiling.formulas.llama` at the
same context; the law is 2·N with Kaplan's N (non-embedding parameters).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from profiling.formulas.llama import DECODER_PARTS, decoder_flops
from profiling.measure import count_flops
from profiling.parts import ATTENTION
from serve.engine.model_runner import kv_bytes_per_block

# A decode's FLOPs other than attention: what the weights cost, the part the law's 2N describes.
WEIGHT_PARTS = ("dense", "lm_head")
WARM_UP_CONTEXT = 128  # the warm-up point's prompt length, at most: a 16k warm-up would double a long run


@dataclass
class ContextPoint:
    """One context length: FLOPs per decoded token (measured, formula, law) and times."""

    context: int  # prompt tokens; the counted decode attends to context + 1 keys
    batch: int  # sequences decoding together
    ttft_s: float  # prefill of the whole batch, to every sequence's first token
    prefill_flops: int  # per sequence, the engine's attribution of its prefill
    decode_flops: dict[str, int]  # per decoded token, by part: the op counter over one decode step / batch
    formula_flops: dict[str, int]  # profiling.formulas.llama for one token after `context` keys
    law_flops: float  # 2·N
    tpot_s: float  # median decode step
    tpot_spread_s: tuple[float, float]  # the fastest and slowest decode step
    kv_bytes: int  # K/V bytes one step reads (batch x (context + 1) keys)

    @property
    def attention_flops(self) -> int:
        return self.decode_flops.get(ATTENTION, 0)

    @property
    def weight_flops(self) -> int:
        return sum(self.decode_flops.get(p, 0) for p in WEIGHT_PARTS)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _max_tokens(engine, context: int, batch: int, decode_tokens: int) -> int:
    """Enough tokens that no sequence finishes before the timed steps end: with a batch, the
    first sequences decode while the later ones still prefill (chunked: max_num_batched_tokens
    prompt tokens a step)."""
    return decode_tokens + 2 + batch * context // engine.config.max_num_batched_tokens + batch


def _prefill(engine, context: int, batch: int, decode_tokens: int, seed: int) -> tuple[list[str], float]:
    """Adds the point's prompts and steps until every one has its first token: (ids, TTFT in s)."""
    from serve.engine import SamplingParams

    params = SamplingParams(
        max_tokens=_max_tokens(engine, context, batch, decode_tokens), temperature=0, ignore_eos=True
    )
    ids = [f"ctx{context}-{seed}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(batch, context, engine.runner.flops.shape.vocab, seed * 1_000_003 + context)):
        engine.add_request(rid, prompt, params)
    started, prefilled = time.perf_counter(), set()
    while len(prefilled) < batch:
        prefilled |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
    return ids, time.perf_counter() - started


def _timed_step(engine, steps: list[float]) -> None:
    t0 = time.perf_counter()
    engine.step()
    steps.append(time.perf_counter() - t0)


def _run_points(engines: dict, context: int, batch: int, decode_tokens: int, seed: int) -> dict[str, ContextPoint]:
    """One point per engine: each prefills (in turn), then the timed decode steps go round-robin,
    one step of each engine a round."""
    started = {name: _prefill(engine, context, batch, decode_tokens, seed) for name, engine in engines.items()}
    prefill = {name: engine.requests[started[name][0][0]].flops_by_part() for name, engine in engines.items()}
    counted = {name: count_flops(engine.step, DECODER_PARTS) for name, engine in engines.items()}
    steps: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(decode_tokens):
        for name, engine in engines.items():
            _timed_step(engine, steps[name])
    points = {}
    for name, engine in engines.items():
        ids, ttft = started[name]
        for rid in ids:
            engine.abort_request(rid)
        shape = engine.runner.flops.shape
        formula = {k: v for k, v in decoder_flops(shape, q_len=1, past_len=context, logits=1).items() if v}
        kv_per_token = kv_bytes_per_block(shape, 1, engine.kv_dtype)  # as stored (int8: codes and scales)
        points[name] = ContextPoint(
            context=context,
            batch=batch,
            ttft_s=ttft,
            prefill_flops=sum(prefill[name].values()),
            decode_flops={k: v // batch for k, v in counted[name].by_part.items()},
            formula_flops=formula,
            law_flops=2.0 * engine.law_params,
            tpot_s=statistics.median(steps[name]),
            tpot_spread_s=(min(steps[name]), max(steps[name])),
            kv_bytes=batch * (context + 1) * kv_per_token,
        )
    return points


def measure_context(
    engine, contexts: list[int], batch: int = 1, decode_tokens: int = 16, seed: int = 0
) -> list[ContextPoint]:
    """One ContextPoint per context length (ascending), after a short warm-up request. Every
    prompt is its own random tokens (no prefix-cache hits); run the engine with prefix caching
    off all the same where the cache may hold them from earlier requests.

    Raises ValueError naming the context when a point cannot fit the model's context or the
    engine's KV cache (`engine.add_request`'s own check)."""
    return measure_contexts({"engine": engine}, contexts, batch, decode_tokens, seed)["engine"]


def measure_contexts(
    engines: dict, contexts: list[int], batch: int = 1, decode_tokens: int = 16, seed: int = 0
) -> dict[str, list[ContextPoint]]:
    """`measure_context` for several engines (by name) on the same prompts, their timed decode
    steps taken in turn (one step of each engine a round), so that a machine whose speed wanders
    during the run (a shared VM's does, by tens of percent over minutes) slows every engine
    alike: the ratio between two engines is then measured, not the drift between their turns.
    Each engine's points as `measure_context` returns them; the same errors."""
    if batch < 1 or decode_tokens < 1:
        raise ValueError(f"batch and decode_tokens must be >= 1, got {batch}, {decode_tokens}")
    for c in contexts:
        if c < 1:
            raise ValueError(f"contexts are prompt lengths of at least 1 token, got {c}")
        for engine in engines.values():
            generated = _max_tokens(engine, c, batch, decode_tokens)
            if c + generated > engine.max_model_len:
                raise ValueError(
                    f"context {c} + up to {generated} generated tokens (the timed decodes and the batch's "
                    f"chunked-prefill margin) does not fit the model's {engine.max_model_len}"
                )
            need = batch * (c + generated + engine.config.block_size)
            if need > engine.max_tokens_in_cache:
                raise ValueError(
                    f"context {c} x batch {batch} needs ~{need:,} KV tokens; the cache holds {engine.max_tokens_in_cache:,}"
                )
    _run_points(
        engines, min(*contexts, WARM_UP_CONTEXT), batch, decode_tokens, seed=-1
    )  # kernels built, allocator warm
    points: dict[str, list[ContextPoint]] = {name: [] for name in engines}
    for c in sorted(contexts):
        for name, point in _run_points(engines, c, batch, decode_tokens, seed).items():
            points[name].append(point)
    return points


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads whatever its batch: each linear's as stored
    (serve.layers.linear: packed, or a float16 copy; a tied lm-head reads the whole embedding
    table through it), every other parameter once. An embedding lookup and the RoPE tables
    (buffers) are read a row per token: left out."""
    read = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(module, "stored_weight"):
            tensors = [
                module.stored_weight(),
                *(t for name, t in module.named_parameters(recurse=False) if name != "weight"),
            ]
        else:
            tensors = list(module.parameters(recurse=False))
        read |= {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # a tied weight once
    return sum(read.values())


@dataclass
class TpotFit:
    """TPOT = fixed_s + per_context_token_s · context, by least squares."""

    fixed_s: float
    per_context_token_s: float


@dataclass
class ContextAnalysis:
    """What the points say, the crossovers in context tokens (None where the data cannot place one)."""

    batch: int
    law_flops_per_token: float  # 2N
    weight_flops_per_token: int  # the formula's dense + lm-head
    weight_bytes: int  # read once per decode step
    kv_bytes_per_key: float  # one sequence's, as stored
    attention_equals_weights_flops: float | None
    kv_equals_weight_bytes: float
    measured_vs_formula_max_gap: float  # the largest relative gap in FLOPs per token, over the points
    tpot_fit: TpotFit | None = None  # with at least 3 points
    tpot_turn: float | None = None  # fixed_s / per_context_token_s where both are > 0


@dataclass
class DevicePeak:
    flops: float  # FLOP/s
    source: str  # the device, dtype and where the peak comes from, in words


@dataclass
class DeviceBandwidth:
    bytes_per_s: float  # the device's probed memory bandwidth (profiling.bandwidth)
    source: str  # the device and when and under what load it was probed, in words


def decode_mbu(point: ContextPoint, weights_bytes: int, bandwidth: float) -> float:
    """A decode step's model bandwidth utilisation: the bytes it reads (every weight once, each
    sequence's K/V) over its TPOT, over the memory's bandwidth. The bytes are modelled, as
    serve.engine.traffic models them; a step's activations and its K/V write are left out."""
    return (
        (weights_bytes + point.kv_bytes) / point.tpot_s / bandwidth
        if point.tpot_s > 0 and bandwidth > 0
        else float("nan")
    )


@dataclass
class ContextReport:
    """`scaling context`'s measurements, what they say, and what they ran on (context.json)."""

    points: list[ContextPoint]
    analysis: ContextAnalysis
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    peak: DevicePeak | None = None  # the device's peak at dtype, for TTFT's bound
    bandwidth: DeviceBandwidth | None = None  # the device's memory bandwidth, for TPOT's MBU

    def to_json(self) -> dict:
        return asdict(self)


def analyze_context(points: list[ContextPoint], weights_bytes: int) -> ContextAnalysis:
    """The crossovers, in context tokens (None where the data cannot place one):

    - `attention_equals_weights_flops`: from the formula (attention FLOPs are linear in the
      context: a·(context + 1)), where a·(L + 1) = the weights' FLOPs per token;
    - `kv_equals_weight_bytes`: where one step's K/V bytes (batch·(L + 1)·bytes per key) equal
      the weights' bytes;
    - `tpot_turn`: from a least-squares line TPOT = t0 + t1·context (numpy.polyfit), L = t0 / t1,
      where the context-proportional time equals the fixed time; None unless t1 > 0 and there
      are at least 3 points.
    Also the largest relative gap between measured and formula FLOPs per token."""
    if not points:
        raise ValueError("no context points to analyze")
    p = points[-1]
    per_key_attention = p.formula_flops.get(ATTENTION, 0) / (p.context + 1)
    weights = sum(p.formula_flops.get(k, 0) for k in WEIGHT_PARTS)
    per_key_bytes = p.kv_bytes / (p.batch * (p.context + 1))
    out = ContextAnalysis(
        batch=p.batch,
        law_flops_per_token=p.law_flops,
        weight_flops_per_token=weights,
        weight_bytes=weights_bytes,
        kv_bytes_per_key=per_key_bytes,
        attention_equals_weights_flops=weights / per_key_attention - 1 if per_key_attention else None,
        kv_equals_weight_bytes=weights_bytes / (p.batch * per_key_bytes) - 1,
        measured_vs_formula_max_gap=max(
            abs(sum(q.decode_flops.values()) / sum(q.formula_flops.values()) - 1) for q in points
        ),
    )
    if len(points) >= 3:
        t1, t0 = np.polyfit([q.context for q in points], [q.tpot_s for q in points], 1)
        out.tpot_fit = TpotFit(fixed_s=float(t0), per_context_token_s=float(t1))
        out.tpot_turn = float(t0 / t1) if t1 > 0 and t0 > 0 else None
    return out
