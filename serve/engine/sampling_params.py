"""How one request wants its tokens chosen and when it wants them to stop (vLLM/OpenAI semantics)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.engine.structured import StructuredOutput

# Below this temperature a request samples greedily (vLLM's _SAMPLING_EPS): logits divided by a
# vanishing temperature overflow float32, and the distribution they tend to is the argmax anyway.
SAMPLING_EPS = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's 64-bit seed, signed or unsigned: what a torch.Generator takes


class ParamError(ValueError):
    """A request refused for one of its own settings. `param` names that setting where the check
    is made (SamplingParams' field name, which the HTTP server reports as the error's `param`),
    so no caller has to guess it from the message."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (below SAMPLING_EPS): greedy
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables
    min_p: float = 0.0  # drop tokens below min_p x the most likely token's probability (after temperature)
    seed: int | None = None  # reproducible sampling: each sequence gets its own seeded generator
    stop: list[str] = field(default_factory=list)  # text stops, trimmed from the output
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # keep a matched stop string in the text
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top-k alternatives
    prompt_logprobs: int | None = None  # likewise for each prompt token after the first (vLLM's name)
    # logit processing, in this order (serve.engine.logits_processors)
    allowed_token_ids: list[int] | None = None  # only these may be generated
    bad_words: list[str] = field(
        default_factory=list
    )  # words never generated (tokenized by the engine, with and without a leading space)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logit of each token id
    repetition_penalty: float = 1.0  # CTRL / transformers: prompt and output tokens, logit / p if > 0 else x p
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output
    skip_special_tokens: bool = True  # in the returned text
    structured: StructuredOutput | None = None  # JSON schema, regex, choice or grammar the output must match
    # scheduling, not sampling (carried here so that one object describes a request): under
    # EngineConfig.scheduling_policy "priority", lower values are scheduled first (vLLM's convention)
    priority: int = 0

    def validate(self, vocab_size: int | None = None) -> None:
        """ParamError naming the first bad field; token ids checked against `vocab_size` when given."""
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ParamError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int):
            raise ParamError("top_k", f"top_k must be an integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ParamError("n", f"n must be >= 1, got {self.n}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ParamError(
                "seed", f"seed must be a 64-bit integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed}"
            )
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError(
                "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ParamError("logprobs", f"logprobs must be >= 0 or None, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ParamError("prompt_logprobs", f"prompt_logprobs must be >= 0 or None, got {self.prompt_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ParamError("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not self.repetition_penalty > 0:
            raise ParamError("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ParamError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.structured is not None and self.min_tokens:
            raise ParamError(
                "min_tokens",
                "min_tokens cannot be combined with a structured output (the grammar decides where it ends)",
            )
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            raise ParamError("logit_bias", "logit_bias values must be in [-100, 100]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ParamError("allowed_token_ids", "allowed_token_ids must not be empty")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ParamError("bad_words", f"bad_words must be non-empty strings, got {self.bad_words!r}")
        ids = {
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": list(self.logit_bias),
            "allowed_token_ids": self.allowed_token_ids or [],
        }
        for name, values in ids.items():
            bad = [t for t in values if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                vocab = f"[0, {vocab_size})" if vocab_size is not None else "non-negative integers"
                raise ParamError(name, f"{name} must be token ids in {vocab}, got {bad[:5]}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def seed_of(self, index: int) -> int:
        """Completion `index`'s seed: seed + index, wrapped into the unsigned 64-bit range a
        torch.Generator takes (the largest seed with n > 1 must not overflow)."""
        return (self.seed + index) % 2**64

    @property
    def processes_logits(self) -> bool:
        """Anything to do to the logits before choosing (serve.engine.logits_processors)."""
        return bool(
            self.allowed_token_ids is not None
            or self.bad_words
            or self.logit_bias
            or self.min_tokens
            or self.repetition_penalty != 1
            or self.presence_penalty
            or self.frequency_penalty
        )
