"""The inference engine: paged KV cache, continuous batching, sampling, per-request compute."""

from serve.engine.llm_engine import LLMEngine
from serve.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from serve.engine.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "EngineStats", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]
