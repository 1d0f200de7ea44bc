"""What every endpoint reads, gathered once per app: the backend, the metrics its answers are
observed into, what is derived from its vocabulary, and the server's options. The endpoints
(serve.api.chat, completions, embeddings, tokenize, status) are plain functions of this and
their request body, so each can be called without HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve.api.limits import longest_token_bytes
from serve.api.metrics import ServingMetrics
from serve.async_engine import Backend
from serve.embeddings import Embedder
from serve.engine.token_bytes import TokenBytes


@dataclass(frozen=True)
class ApiContext:
    backend: Backend
    metrics: ServingMetrics
    token_bytes: TokenBytes  # logprobs' token text and bytes, from the vocabulary
    longest_token: int  # the most bytes one token spells: the unit of the prompt-length bound (serve.api.limits)
    chat_template: str | None = None  # Jinja text replacing the tokenizer's (--chat-template)
    trust_request_chat_template: bool = False  # run a request's own chat_template (code the server executes, sandboxed)
    embedder: Embedder | None = None  # serves /v1/embeddings

    @classmethod
    def create(
        cls,
        backend: Backend,
        chat_template: str | None = None,
        trust_request_chat_template: bool = False,
        embedder: Embedder | None = None,
        hidden_metrics_version: tuple[int, int] | None = None,
    ) -> ApiContext:
        """The context of a server for `backend`: fresh metrics (vLLM's retired names among them
        for `hidden_metrics_version`, serve.api.metrics), the vocabulary's token bytes."""
        token_bytes = TokenBytes(backend.tokenizer)
        return cls(
            backend,
            ServingMetrics(backend.model_name, backend.max_model_len, hidden_metrics_version),
            token_bytes,
            longest_token_bytes(token_bytes, len(backend.tokenizer)),
            chat_template,
            trust_request_chat_template,
            embedder,
        )

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.backend.tokenizer)
