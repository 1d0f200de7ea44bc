"""POST /tokenize and /detokenize (vLLM's): a prompt, or chat messages through the chat
template, as the model's token ids; token ids as text."""

from __future__ import annotations

from serve.api.admission import Prompt, check_model, room
from serve.api.context import ApiContext
from serve.api.prompts import chat_prompt_ids, tokenized
from serve.api.protocol import DetokenizeRequest, TokenizeRequest


async def tokenize(ctx: ApiContext, body: TokenizeRequest) -> dict:
    check_model(ctx, body.model)
    if body.messages is not None:
        ids = await chat_prompt_ids(ctx, body, body.tool_dicts())
    else:
        (ids,) = await tokenized(
            ctx,
            [body.prompt],
            "prompt",
            lambda: [ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)],
        )
    return {
        "count": len(ids),
        "max_model_len": ctx.backend.max_model_len,
        "tokens": ids,
        "token_strs": ctx.tokenizer.convert_ids_to_tokens(ids),
    }


async def detokenize(ctx: ApiContext, body: DetokenizeRequest) -> dict:
    """400 for ids outside the vocabulary or more than the context holds, as a prompt's."""
    check_model(ctx, body.model)
    room(ctx, Prompt(body.tokens, "tokens"), 0)
    return {"prompt": ctx.tokenizer.decode(body.tokens)}
