"""How long an engine step takes, predicted from what it carries, fitted from measured steps.

Why: under `max_itl_ms` the scheduler caps a step's prefill tokens so that the sequences already
decoding see a bounded gap between their tokens (a step that carries a 512-token prefill chunk
stalls every running decode for the whole chunk). The cap needs the step time as a function of
the step's contents on this machine and model, which no constant knows, so the engine fits it
from its own steps:

    seconds = base + decode * decode_tokens + prefill * prefill_tokens + attention * prefill_attention

`prefill_attention` is a chunk's attention work: its tokens times the context they attend to
(the sequence's computed past plus half the chunk, causal), in thousands of tokens. It matters
for a chunk deep into a long prompt, where attention, not the linear layers, grows.

The fit is least squares over the recent steps, the last `window` / 2 that prefilled and the
last `window` / 2 that did not (a long run of decode-only steps does not push the prefill
steps, the only ones that tell the prefill terms, out of the window), pulled toward a prior:
before enough steps are seen, or where the steps seen do not separate two terms (every step
with the same number of decodes), the prior holds. The prior is conservative (it overestimates a CPU's step
time), so the first prefill chunks beside decodes are small rather than too large.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import astuple, dataclass

from serve.engine.sequence import Sequence


@dataclass(frozen=True)
class StepShape:
    """What a step carries, in the terms of the cost model."""

    decode_tokens: int  # decoding sequences' tokens (drafts being verified included)
    prefill_tokens: int  # prompt (or recompute) chunk tokens
    prefill_attention: float  # sum over chunks of tokens x (past + tokens / 2), in thousands

    def features(self) -> tuple[float, float, float, float]:
        return 1.0, float(self.decode_tokens), float(self.prefill_tokens), self.prefill_attention


@dataclass(frozen=True)
class StepCoefficients:
    """Seconds: per step, per decode token, per prefill token, per unit of prefill attention."""

    base: float
    decode: float
    prefill: float
    attention: float

    def predict(self, shape: StepShape) -> float:
        return sum(c * x for c, x in zip(astuple(self), shape.features()))


# A 135M model on two CPU cores runs a step of 8 decodes in ~30 ms and prefills ~2,000 tokens/s:
# this prior is slower than that everywhere, so it errs toward small chunks until the fit takes over.
CONSERVATIVE_PRIOR = StepCoefficients(base=0.02, decode=0.002, prefill=0.001, attention=0.0002)
MIN_STEPS = 8  # measured steps before the fit replaces the prior (the first ones include warm-up)
# the prior's weight in the fit, in steps: small, it only decides the terms the steps seen do not
PRIOR_WEIGHT = 0.01
# typical size of each feature, so that the prior weighs alike on every coefficient
FEATURE_SCALE = (1.0, 8.0, 256.0, 256.0)


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a @ x = b, for a small positive definite a (Gaussian elimination, partial pivoting)."""
    n = len(b)
    rows = [[*a[i], b[i]] for i in range(n)]
    for k in range(n):
        pivot = max(range(k, n), key=lambda r: abs(rows[r][k]))
        rows[k], rows[pivot] = rows[pivot], rows[k]
        for r in range(k + 1, n):
            factor = rows[r][k] / rows[k][k]
            rows[r] = [v - factor * w for v, w in zip(rows[r], rows[k])]
    x = [0.0] * n
    for k in reversed(range(n)):
        x[k] = (rows[k][n] - sum(rows[k][j] * x[j] for j in range(k + 1, n))) / rows[k][k]
    return x


def chunk_attention(past: int, tokens: int) -> float:
    """A prefill chunk's attention work: `tokens` queries over `past` + about half the chunk, /1000."""
    return tokens * (past + tokens / 2) / 1000


def shape_of(batch: list[tuple[Sequence, int]]) -> StepShape:
    """A scheduled batch's shape, read before its sequences advance."""
    decodes = prefill = 0
    attention = 0.0
    for seq, n in batch:
        if is_prefill(seq):
            prefill += n
            attention += chunk_attention(seq.num_computed_tokens, n)
        else:
            decodes += n
    return StepShape(decodes, prefill, attention)


def is_prefill(seq: Sequence) -> bool:
    """Whether seq's next tokens are a prompt (or a recompute) rather than one decode and its drafts."""
    return seq.num_tokens - seq.num_computed_tokens - seq.num_drafts > 1


class StepCostModel:
    """Step time online: `observe` each measured step, `predict` or ask for a prefill budget."""

    def __init__(self, prior: StepCoefficients = CONSERVATIVE_PRIOR, window: int = 64) -> None:
        self.prior = prior
        self.prefill_steps: deque[tuple[StepShape, float]] = deque(maxlen=window // 2)
        self.decode_steps: deque[tuple[StepShape, float]] = deque(maxlen=window - window // 2)
        self.coefficients = prior

    def observe(self, shape: StepShape, seconds: float) -> None:
        """Add a measured step and refit (4 unknowns over at most `window` steps: ~0.1 ms)."""
        (self.prefill_steps if shape.prefill_tokens else self.decode_steps).append((shape, seconds))
        self.coefficients = self.fit()

    def fit(self) -> StepCoefficients:
        """The prior until MIN_STEPS steps are seen; then least squares over the kept steps, with
        the prior as PRIOR_WEIGHT pseudo-steps per coefficient (each feature at its typical
        size), which settles what the steps do not. A coefficient fitted below zero is clamped
        to zero: a step never gets faster for carrying more. Plain Python normal equations (4x4,
        well conditioned by the scaling and the prior): a BLAS call here would start threads
        that compete with the model's for the same cores, every step."""
        steps = [*self.prefill_steps, *self.decode_steps]
        if len(steps) < MIN_STEPS:
            return self.prior
        gram = [[PRIOR_WEIGHT * (i == j) for j in range(4)] for i in range(4)]
        rhs = [PRIOR_WEIGHT * c * scale for c, scale in zip(astuple(self.prior), FEATURE_SCALE)]
        for shape, seconds in steps:
            x = [f / scale for f, scale in zip(shape.features(), FEATURE_SCALE)]  # columns of like size
            for i in range(4):
                rhs[i] += x[i] * seconds
                for j in range(4):
                    gram[i][j] += x[i] * x[j]
        solution = solve(gram, rhs)
        return StepCoefficients(*(max(0.0, c / scale) for c, scale in zip(solution, FEATURE_SCALE)))

    def predict(self, shape: StepShape) -> float:
        return self.coefficients.predict(shape)

    def prefill_budget(self, target_s: float, decode_tokens: int, past: int) -> int:
        """The most prefill tokens a step with `decode_tokens` decodes may carry and still be
        predicted to take at most `target_s`, for a chunk after `past` computed tokens (0 when
        even the decodes alone are predicted over the target). Solves the model's quadratic in
        the chunk size: attention * n * (past + n/2) / 1000 + prefill * n = room."""
        c = self.coefficients
        room = target_s - c.base - c.decode * decode_tokens
        if room <= 0:
            return 0
        a = c.attention / 2000
        b = c.prefill + c.attention * past / 1000
        if a == 0:
            tokens = room / b if b > 0 else float(1 << 30)
        else:
            tokens = (-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)
        return int(tokens + 1e-6)  # a rounding error in the last bit does not cost a token
