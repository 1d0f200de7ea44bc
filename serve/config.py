"""What a user sets when starting the engine, and the derived limits it implies.

The model's own config (context length, RoPE scaling) is read from its transformers directory;
`EngineConfig` only overrides it. Everything a user can get wrong is checked here, at start-up,
with a message naming the setting, instead of surfacing later as a shape error mid-request.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = {**DTYPES, "int8": torch.int8}  # int8: a float32 scale per token and head beside the codes
SCHEDULING_POLICIES = ("fcfs", "priority")
DEFAULT_JSON_MAX_DIGITS = 15  # integers up to 10^15 - 1 stay exact as float64 (JavaScript's numbers)
DEFAULT_CPU_KV_BYTES = 1 << 30  # CPU memory is shared with everything else: a fixed, modest default
DEFAULT_GPU_KV_FRACTION = 0.8  # of the GPU memory free after loading the weights


def flag(default: Any, help: str | None = None, **options: Any) -> Any:
    """A field every command that starts an engine takes as a flag of its name (max_num_seqs:
    --max-num-seqs, serve.cli): its default, stated here only, and the flag's help (choices,
    metavar). Fields without one are set by hand-written flags, or not from the command line."""
    return field(default=default, metadata={"flag": {"help": help, **options}})


@dataclass
class EngineConfig:
    model: str | None = flag(None, "transformers dir, .gguf file, or 'smollm2' (default)")
    device: str = flag("cpu")
    dtype: str = flag("auto", choices=("auto", *DTYPES))
    # linear weights stored in float16, float32 math (CPU, float32 only; serve.layers.linear).
    # None: on when dtype is "auto" and resolves to float32 on the CPU with the C++ kernels built
    half_weights: bool | None = None
    # KV cache storage (serve.layers.attention)
    kv_cache_dtype: str = flag(
        "auto",
        "KV cache storage (int8: a scale per token and head); auto: the model's dtype, float16 "
        "under a float32 model with --dtype auto on the CPU",
        choices=("auto", *KV_DTYPES),
    )
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int | None = None  # KV budget in bytes ...
    kv_cache_fraction: float | None = flag(None, "KV-cache budget as a fraction of free memory")
    # default: the model's context (max_position_embeddings; x factor under RoPE scaling)
    max_model_len: int | None = flag(None, "default: the model's context length")
    max_num_seqs: int = flag(64, "sequences batched at once")
    max_num_batched_tokens: int = flag(512, "tokens per engine step")  # decodes + prefill chunks
    # prefill beside running decodes (serve.engine.scheduler, PrefillLimits): None/0/1 as today
    max_itl_ms: float | None = flag(
        None,
        "while sequences decode, cap each step's prefill so its predicted time (fitted from "
        "measured steps) stays under this many ms; default: no cap",
        metavar="MS",
    )
    long_prefill_token_threshold: int = flag(
        0, "a prompt longer than this takes at most this many tokens a step (vLLM's); 0: off"
    )
    max_num_partial_prefills: int = flag(
        1, "prompts part-way prefilled at once, sharing a step's prefill budget (vLLM's)"
    )
    enable_prefix_caching: bool = True
    # fcfs: waiting requests in arrival order; priority: by each request's `priority` (lower
    # first, then arrival), and preemption takes the lowest-priority running sequence (vLLM's policies)
    scheduling_policy: str = flag(
        "fcfs",
        "fcfs: arrival order; priority: by each request's `priority` (lower first), then arrival",
        choices=SCHEDULING_POLICIES,
    )
    # n-gram (prompt-lookup) speculative decoding (serve.engine.speculative): drafts per step for
    # greedy sequences, 0: off; matched n-grams of prompt_lookup_min..prompt_lookup_max tokens
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # the prefix cache's disk tier (serve.engine.disk_cache); None: off
    kv_cache_disk: str | None = flag(
        None,
        "keep full KV blocks as files here too: a prefix reused after eviction or a restart is loaded, not prefilled",
        metavar="DIR",
    )
    kv_cache_disk_bytes: int = 10 << 30  # its size cap
    # override of the model's rope_parameters
    rope_scaling: dict | None = flag(
        None,
        'RoPE scaling replacing the model\'s, e.g. \'{"rope_type": "yarn", "factor": 2.0, '
        '"original_max_position_embeddings": 8192}\' to serve 16k from an 8k model',
        metavar="JSON",
    )
    ledger: str | None = None  # JSONL compute ledger path; None = off
    # under a JSON schema, the most digits of a number's integer part (and of its fraction) where
    # the schema sets no bound: greedy decoding otherwise writes 1111... to max_tokens
    # (serve.engine.structured.capped_digits)
    json_max_digits: int = flag(
        DEFAULT_JSON_MAX_DIGITS,
        "under a JSON schema (response_format, guided_json, forced tool calls): "
        "the most digits a number may have before its point (and after it) where the schema sets no "
        "bound; 15 keeps integers exact in float64",
        metavar="N",
    )

    def validate(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be auto or one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}"
            )
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if self.num_speculative_tokens and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_fraction is not None:
            raise ValueError("set kv_cache_bytes or kv_cache_fraction, not both")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.kv_cache_disk is not None and not self.enable_prefix_caching:
            raise ValueError("kv_cache_disk is the prefix cache's disk tier: it needs enable_prefix_caching")
        if self.kv_cache_disk_bytes <= 0:
            raise ValueError(f"kv_cache_disk_bytes must be > 0, got {self.kv_cache_disk_bytes}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.json_max_digits < 2:
            raise ValueError(
                f"json_max_digits must be >= 2 (a number's digits before its point), got {self.json_max_digits}"
            )
        if self.max_itl_ms is not None and not 0 < self.max_itl_ms < float("inf"):
            raise ValueError(f"max_itl_ms (--max-itl-ms) must be a number of milliseconds > 0, got {self.max_itl_ms}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold (--long-prefill-token-threshold) must be >= 0 (0: off), "
                f"got {self.long_prefill_token_threshold}"
            )
        if self.max_num_partial_prefills < 1:
            raise ValueError(
                f"max_num_partial_prefills (--max-num-partial-prefills) must be >= 1, got {self.max_num_partial_prefills}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

    def kv_cache_budget(self) -> int:
        """Bytes for the KV cache: as set, or the fraction of the memory available now."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        if self.kv_cache_fraction is not None:
            return int(memory_available(torch.device(self.device)) * self.kv_cache_fraction)
        if torch.device(self.device).type == "cpu":
            return DEFAULT_CPU_KV_BYTES
        return int(memory_available(torch.device(self.device)) * DEFAULT_GPU_KV_FRACTION)

    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU unless this CPU runs bf16 clearly faster (measured, profiling.cpu);
        bfloat16 on CUDA. An explicit bfloat16 on a CPU that is slow at it is refused: it
        would run ~100x slower than float32 on some CPUs, which looks like a hang."""
        device = torch.device(self.device)
        if self.dtype == "auto":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16  # a GPU before bf16 (pre-Ampere): half precision all the same
            from profiling.hardware import auto_dtype

            return torch.bfloat16 if auto_dtype(device) == "bf16" else torch.float32
        if device.type == "cpu" and self.dtype == "bfloat16":
            from profiling.cpu import preferred_cpu_dtype

            if preferred_cpu_dtype() != "bf16":
                raise ValueError("dtype bfloat16 is slow on this CPU (profiling.cpu measured it); use float32")
        return DTYPES[self.dtype]

    def use_half_weights(self, dtype: torch.dtype) -> bool:
        """Whether linear weights are stored in float16 for compute dtype `dtype`: as set, or by
        default where the model runs in float32 on the CPU because the dtype was left to auto
        (an explicit float32 means float32 weights too: what the correctness tests compare)."""
        from serve.layers.linear import can_store_half

        possible = can_store_half(torch.device(self.device), dtype)
        if self.half_weights is None:
            return self.dtype == "auto" and possible
        if self.half_weights and not possible:
            raise ValueError(
                "half_weights needs the CPU, dtype float32 and the C++ kernels (serve.kernels; see the log for why they are missing)"
            )
        return self.half_weights

    def kv_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The KV cache's storage dtype for a model computing in `dtype`: as set, or by default
        the model's, but float16 where the model runs in float32 on the CPU because the dtype was
        left to auto (half the bytes a long-context decode streams, widened in registers by the
        decode kernel; an explicit float32 keeps a float32 cache, as it keeps float32 weights)."""
        if self.kv_cache_dtype != "auto":
            return KV_DTYPES[self.kv_cache_dtype]
        if self.dtype == "auto" and dtype == torch.float32 and torch.device(self.device).type == "cpu":
            return torch.float16
        return dtype


def flag_fields() -> list[Field]:
    """EngineConfig's fields that are command-line flags of their own (`flag`)."""
    return [f for f in fields(EngineConfig) if "flag" in f.metadata]


def memory_available(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("cannot read the available memory (/proc/meminfo): set kv_cache_bytes")


def rope_parameters(hf_config, override: dict | None) -> dict:
    """The model's RoPE parameters (transformers 5 `rope_parameters`), with `override` applied.
    Old-style keys ('type') are accepted; rope_theta is kept from the model."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    if override:
        override = dict(override)
        if "type" in override:
            override["rope_type"] = override.pop("type")
        params = {"rope_theta": params["rope_theta"], **override}
    return params


def context_limit(hf_config, rope: dict) -> int:
    """The longest context the engine runs the model at: scaled RoPE stretches the original
    training length by `factor` (for yarn/llama3 configs that already equals
    max_position_embeddings)."""
    base = rope.get("original_max_position_embeddings", hf_config.max_position_embeddings)
    return max(hf_config.max_position_embeddings, int(base * rope.get("factor", 1.0)))
