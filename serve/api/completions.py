"""POST /v1/completions: a prompt (text or token ids) or a batch of them, `n` choices each
(indexed prompt * n + choice, as OpenAI does), streamed or whole, with OpenAI's legacy echo and
logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi.responses import Response
from starlette.types import Receive

from serve.api.admission import Prompt, admit, check_model
from serve.api.context import ApiContext
from serve.api.outputs import completion_logprobs, prompt_logprob_entries
from serve.api.prompts import tokenized
from serve.api.protocol import CompletionRequest
from serve.api.responses import CompletionChoice, CompletionResponse, Usage
from serve.api.streams import merged_outputs, respond
from serve.engine.outputs import CompletionOutput, RequestOutput
from serve.engine.token_bytes import TokenBytes


@dataclass
class CompletionChoices:
    """How one request's completions become choices. With echo, each choice's text begins with
    its prompt's (OpenAI's rule for legacy completions), and with logprobs its logprobs begin
    with the prompt tokens' (the first one's null), noted as they arrive."""

    request_id: str
    model: str
    n: int
    token_bytes: TokenBytes
    want_logprobs: bool
    echoed: list[str] | None  # each prompt's text, with echo
    prompt_logprobs: int | None  # echo with logprobs: the prompt's top alternatives per token
    prompt_entries: dict[int, list[dict]] = field(default_factory=dict)  # prompt index -> its tokens' entries

    def choice(self, c: CompletionOutput, streamed: bool) -> CompletionChoice:
        """The whole choice, or (`streamed`) this step's share of it: the echo leads the whole
        text, or, streamed with logprobs, the choice's first chunk (the prompt's logprobs exist
        only once its prefill has run)."""
        i = c.index // self.n
        first_chunk = streamed and self.prompt_logprobs is not None and len(c.token_ids) == len(c.new_token_ids)
        prefix = self.echoed[i] if self.echoed and (not streamed or first_chunk) else ""
        lp = None
        if self.want_logprobs:
            prompt = self.prompt_entries.get(i) if prefix and self.prompt_logprobs is not None else None
            echo_len = len(self.echoed[i]) if self.prompt_logprobs is not None else 0
            lp = completion_logprobs(c, streamed, self.token_bytes, prompt, echo_len)
        return CompletionChoice(
            index=c.index,
            text=prefix + (c.new_text if streamed else c.text),
            finish_reason=c.finish_reason,
            logprobs=lp,
        )

    def chunk(self, cs: list[CompletionOutput]) -> list[CompletionResponse]:
        """This step's share of the changed choices; none for a step whose tokens all wait on a
        character not yet whole (text and logprobs alike). No `cs`: the closing usage chunk."""
        choices = [
            ch
            for ch in (self.choice(c, True) for c in cs)
            if ch.text or ch.finish_reason or (ch.logprobs and ch.logprobs.tokens)
        ]
        return [CompletionResponse(id=self.request_id, model=self.model, choices=choices)] if choices or not cs else []

    def whole(self, cs: list[CompletionOutput], usage: Usage) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, model=self.model, choices=[self.choice(c, False) for c in cs], usage=usage
        )

    async def noting_prompt_logprobs(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """`outputs`, each prompt's logprob entries kept as they first arrive."""
        async with aclosing(outputs):
            async for out in outputs:
                if out.prompt_logprobs is not None and out.outputs:
                    self.prompt_entries.setdefault(out.outputs[0].index // self.n, prompt_logprob_entries(out))
                yield out

    def opening(self) -> CompletionResponse | None:
        """A stream's first chunk: the echoed prompts, when no logprobs must come with them."""
        if not self.echoed or self.prompt_logprobs is not None:
            return None
        return CompletionResponse(
            id=self.request_id,
            model=self.model,
            choices=[
                CompletionChoice(index=i * self.n + j, text=text)
                for i, text in enumerate(self.echoed)
                for j in range(self.n)
            ],
        )


async def prompts_of(ctx: ApiContext, body: CompletionRequest) -> list[Prompt]:
    """The batch's prompts as token ids (texts tokenized, token ids as given), each truncated as
    asked and named for errors (`prompt`, or `prompt.i` in a batch)."""
    batch = body.prompts
    name = "prompt" if len(batch) == 1 else "prompt.{}"
    texts = [p for p in batch if isinstance(p, str)]
    encoded = iter(
        await tokenized(ctx, texts, "prompt", lambda: [ctx.tokenizer.encode(p) for p in texts]) if texts else []
    )
    return [
        Prompt(body.truncated(p if isinstance(p, list) else next(encoded)), name.format(i)) for i, p in enumerate(batch)
    ]


async def completions(ctx: ApiContext, body: CompletionRequest, request_id: str, receive: Receive) -> Response:
    """The answer to one request (`request_id`: its X-Request-Id; `receive`: its ASGI channel,
    where a disconnect arrives)."""
    check_model(ctx, body.model)
    request_id, want_logprobs = f"cmpl-{request_id}", body.logprobs is not None  # the response's id, as vLLM names it
    prompt_logprobs = body.logprobs if body.echo and want_logprobs else None
    streams = await admit(
        ctx,
        request_id,
        await prompts_of(ctx, body),
        body.requested_max_tokens,
        structured_field=body.structured_field(),
        sampling=lambda m: body.sampling_params(m, body.logprobs, prompt_logprobs, ctx.backend.sampling_defaults),
    )
    echoed = [p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in body.prompts] if body.echo else None
    choices = CompletionChoices(
        request_id, ctx.backend.model_name, body.n, ctx.token_bytes, want_logprobs, echoed, prompt_logprobs
    )
    return await respond(
        receive,
        body,
        choices.noting_prompt_logprobs(merged_outputs(streams, body.n)),
        want_logprobs,
        chunk=choices.chunk,
        whole=choices.whole,
        opening=choices.opening() if body.stream else None,
    )
