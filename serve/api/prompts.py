"""Requests' text as token ids: texts tokenized in a worker thread once they are known to be
short enough to fit (serve.api.limits), chat messages (and tools) through a chat template.
Every refusal is a 400 naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from serve.api.context import ApiContext
from serve.api.errors import ApiError
from serve.api.limits import check_prompt_chars
from serve.api.protocol import ChatCompletionRequest, TokenizeRequest, template_messages
from serve.api.tools import render_messages

RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "tools",
        "documents",
    }
)


async def tokenized(
    ctx: ApiContext, texts: list[str], field: str, encode: Callable[[], list[list[int]]]
) -> list[list[int]]:
    """`encode()` run in a worker thread, once `texts` are known to be short enough to fit
    (400 naming `field` otherwise, before any tokenizing)."""
    try:
        check_prompt_chars(texts, ctx.backend.max_model_len, ctx.longest_token, field)
    except ValueError as exc:
        raise ApiError(400, str(exc), param=field) from None
    return await asyncio.to_thread(encode)


def chat_template(ctx: ApiContext, body: ChatCompletionRequest | TokenizeRequest) -> str:
    """The template the messages go through: the request's (on a server that trusts it), else
    the server's (--chat-template), else the tokenizer's; 400 naming the field for a templating
    request that cannot be honoured."""
    if body.chat_template is not None and not ctx.trust_request_chat_template:
        raise ApiError(
            400,
            "chat_template: this server does not run templates sent with a request "
            "(start it with --trust-request-chat-template)",
            param="chat_template",
        )
    template = body.chat_template or ctx.chat_template or ctx.tokenizer.chat_template
    if template is None:
        raise ApiError(
            400,
            "this model's tokenizer has no chat template: send the prompt to /v1/completions, or start "
            "the server with --chat-template FILE",
            param="messages",
        )
    if body.continue_final_message and body.add_generation_prompt:
        raise ApiError(
            400,
            "continue_final_message continues the last message in place: set add_generation_prompt to false",
            param="continue_final_message",
        )
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise ApiError(400, "continue_final_message needs an assistant message last", param="continue_final_message")
    reserved = RESERVED_TEMPLATE_KWARGS & set(body.chat_template_kwargs or {})
    if reserved:
        raise ApiError(
            400, f"chat_template_kwargs: {sorted(reserved)} are set by the request itself", param="chat_template_kwargs"
        )
    return template


async def chat_prompt_ids(
    ctx: ApiContext, body: ChatCompletionRequest | TokenizeRequest, tools: list[dict] | None = None
) -> list[int]:
    """The messages (and `tools`, serve.api.tools) rendered by the chat template and tokenized;
    400 naming the field for what cannot be rendered."""
    template = chat_template(ctx, body)
    messages, extra = render_messages(template_messages(body.messages), tools, template)

    def encode() -> list[list[int]]:
        try:
            text = ctx.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                tokenize=False,
                **extra,
                **(body.chat_template_kwargs or {}),
            )
        except Exception as exc:  # noqa: BLE001 - chat templates raise whatever jinja raises
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
        return [ctx.tokenizer.encode(text, add_special_tokens=False)]

    (ids,) = await tokenized(ctx, [m["content"] or "" for m in messages], "messages", encode)
    return ids
