"""POST /v1/chat/completions: the messages through the chat template, `n` choices, streamed or
whole; with tools, the calls the model writes parsed out of its text (serve.api.tools), and a
required or named tool choice enforced by a grammar that writes the calls."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi.responses import Response
from starlette.types import Receive

from serve.api.admission import Prompt, admit, check_model
from serve.api.context import ApiContext
from serve.api.errors import ApiError
from serve.api.outputs import chat_logprobs
from serve.api.prompts import chat_prompt_ids
from serve.api.protocol import ChatCompletionRequest
from serve.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ResponseToolCall,
    Usage,
)
from serve.api.streams import respond
from serve.api.tools import ToolStream, parse_tool_calls, tool_grammar
from serve.engine.outputs import CompletionOutput
from serve.engine.sampling_params import SamplingParams
from serve.engine.token_bytes import TokenBytes


@dataclass
class ChatChoices:
    """How one request's completions become chat choices and stream chunks. With tools
    (`streams`: one ToolStream per choice), content is held back while it may open a tool call,
    and the calls found are sent as OpenAI sends them."""

    request_id: str
    model: str
    token_bytes: TokenBytes
    want_logprobs: bool
    parallel_tool_calls: bool
    streams: dict[int, ToolStream] | None  # choice index -> its tool-call parser; None without tools
    forced: bool = False  # a required or named tool choice: the grammar writes only calls, never content
    roled: set[int] = field(default_factory=set)  # choices whose first chunk (with the role) went out

    def calls_in(self, calls: list[dict], c: CompletionOutput) -> tuple[list[dict], str | None]:
        """The calls the choice answers with, and its finish reason (tool_calls where it made any)."""
        calls = calls if self.parallel_tool_calls else calls[:1]
        return calls, ("tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason)

    def deltas(self, c: CompletionOutput) -> list[ChatChunkChoice]:
        """This step's share of choice `c`: its new content, and when it finishes, its tool calls."""
        lp = chat_logprobs(c, True, self.token_bytes) if self.want_logprobs else None
        lp = lp if lp is not None and lp.content else None  # tokens of a character not yet whole wait with its text
        if self.streams is None:
            if not (c.new_text or c.finish_reason or lp):
                return []
            return [
                ChatChunkChoice(
                    index=c.index,
                    delta=ChatDelta(content=c.new_text or None),
                    finish_reason=c.finish_reason,
                    logprobs=lp,
                )
            ]
        text = "" if self.forced else self.streams[c.index].content(c.new_text)
        if not c.finish_reason:
            return (
                [ChatChunkChoice(index=c.index, delta=ChatDelta(content=text or None), logprobs=lp)]
                if text or lp
                else []
            )
        rest, found = ("", self.forced_calls(c)) if self.forced else self.streams[c.index].finish()
        calls, reason = self.calls_in(found, c)
        out = (
            [ChatChunkChoice(index=c.index, delta=ChatDelta(content=text + rest or None), logprobs=lp)]
            if text + rest or lp
            else []
        )
        for i, call in enumerate(calls):  # OpenAI's shape: id, type and name first, then the arguments
            opening = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            out += [
                ChatChunkChoice(index=c.index, delta=ChatDelta(tool_calls=[opening])),
                ChatChunkChoice(
                    index=c.index,
                    delta=ChatDelta(
                        tool_calls=[{"index": i, "function": {"arguments": call["function"]["arguments"]}}]
                    ),
                ),
            ]
        return out + [ChatChunkChoice(index=c.index, delta=ChatDelta(), finish_reason=reason)]

    @staticmethod
    def forced_calls(c: CompletionOutput) -> list[dict]:
        """A forced choice's complete calls. Its grammar writes nothing but calls, so the text
        outside them is at most a call that `max_tokens` cut: dropped (the finish reason says
        "length"), never handed back as content markup or as a call whose arguments do not parse."""
        return parse_tool_calls(c.text)[1]

    def chunks(self, cs: list[CompletionOutput]) -> list[ChatCompletionChunk]:
        """One chunk of this step's changed choices; with tools, one chunk per delta."""
        deltas = self.with_role([d for c in cs for d in self.deltas(c)])
        if self.streams is None or not cs:  # no cs: the closing chunk that carries the usage
            return (
                [ChatCompletionChunk(id=self.request_id, model=self.model, choices=deltas)] if deltas or not cs else []
            )
        return [ChatCompletionChunk(id=self.request_id, model=self.model, choices=[d]) for d in deltas]

    def with_role(self, deltas: list[ChatChunkChoice]) -> list[ChatChunkChoice]:
        """`deltas`, each choice's first one carrying the role. The role rides on the first
        generated content (or tool call, or the finish of an empty answer), as vLLM sends it, not
        in a chunk of its own before prefill: clients stamp time-to-first-token on the first
        chunk. A forced tool call's content stays null, as OpenAI streams it."""
        for d in deltas:
            if d.index not in self.roled:
                self.roled.add(d.index)
                d.delta.role = "assistant"
                if d.delta.content is None and d.delta.tool_calls is None and not self.forced:
                    d.delta.content = ""
        return deltas

    def whole(self, cs: list[CompletionOutput], usage: Usage) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.request_id, model=self.model, choices=[self.choice(c) for c in cs], usage=usage
        )

    def choice(self, c: CompletionOutput) -> ChatChoice:
        """The whole choice; with tools, its calls parsed out of the text."""
        lp = chat_logprobs(c, False, self.token_bytes) if self.want_logprobs else None
        if self.streams is None:
            return ChatChoice(
                index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason, logprobs=lp
            )
        content, found = (None, self.forced_calls(c)) if self.forced else parse_tool_calls(c.text)
        calls, reason = self.calls_in(found, c)
        message = ChatResponseMessage(content=content, tool_calls=[ResponseToolCall(**call) for call in calls] or None)
        return ChatChoice(index=c.index, message=message, finish_reason=reason, logprobs=lp)


def forced_calls(params: SamplingParams, tools: list[dict], mode: str, parallel: bool) -> SamplingParams:
    """`params` whose grammar writes the calls of a required (`mode` "required") or named tool
    choice; 400 naming `tools` for a tool whose parameters the grammar cannot enforce."""
    try:
        params.structured = tool_grammar(tools, None if mode == "required" else mode, parallel)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="tools") from None
    return params


async def chat_completions(ctx: ApiContext, body: ChatCompletionRequest, request_id: str, receive: Receive) -> Response:
    """The answer to one request (`request_id`: its X-Request-Id; `receive`: its ASGI channel,
    where a disconnect arrives)."""
    check_model(ctx, body.model)
    mode = body.tool_mode()  # None, "none", "auto", "required" or a function's name
    tools = body.tool_dicts() if mode not in (None, "none") else None
    prompt = Prompt(body.truncated(await chat_prompt_ids(ctx, body, tools)), "messages")
    forced = mode not in (None, "none", "auto")  # required or named: the grammar writes the calls

    def sampling(max_tokens: int) -> SamplingParams:
        params = body.sampling_params(max_tokens, body.num_logprobs, None, ctx.backend.sampling_defaults)
        return forced_calls(params, tools, mode, body.parallel_tool_calls) if forced else params

    request_id = f"chatcmpl-{request_id}"  # the response's id, as vLLM names it
    (outputs,) = await admit(
        ctx,
        request_id,
        [prompt],
        body.requested_max_tokens,
        sampling,
        "tool_choice" if forced else body.structured_field(),
    )
    choices = ChatChoices(
        request_id,
        ctx.backend.model_name,
        ctx.token_bytes,
        body.logprobs,
        body.parallel_tool_calls,
        {i: ToolStream() for i in range(body.n)} if tools else None,
        forced,
    )
    return await respond(receive, body, outputs, body.logprobs, chunk=choices.chunks, whole=choices.whole)
