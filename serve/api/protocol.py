"""The OpenAI wire format: request bodies (validated) and response bodies, for completions and
chat completions, plus vLLM's extensions (top_k, stop_token_ids, ignore_eos, /tokenize).

Requests are pydantic models so a malformed field is refused before it reaches the engine,
with the field's name in the error (`ApiError.param`), and so is a field they do not declare
(fail closed: a client asking for something this server does not do gets a 400 naming it, never
a 200 that ignored it). Each request turns itself into the engine's SamplingParams; the server
never reads sampling fields one by one.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from serve.api.errors import ApiError
from serve.api.protocol_parts import (
    NamedToolChoice,
    ResponseFormat,
    Strict,
    StructuredOutputs,
    Tool,
    ToolCall,
)
from serve.engine.sampling_params import SEED_RANGE, SamplingParams
from serve.engine.structured import StructuredOutput

MAX_LOGPROBS = 20  # OpenAI's cap on alternatives per token
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens for /v1/completions when it is not set
# Sizes the engine pays for per step or per request, capped so that no one request is expensive to
# refuse or to carry (each refusal names its field): OpenAI's 4 stops; then generous bounds.
MAX_STOPS, MAX_STOP_CHARS = 4, 256
MAX_TOKEN_LISTS = 1_024  # logit_bias entries, stop_token_ids, bad_words
MAX_BAD_WORD_CHARS = 256
MAX_TOOLS = 128  # OpenAI's
MAX_EMBEDDING_INPUTS = 2_048  # OpenAI's
TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²".isdigit() is True, int("²") fails


Batch = str | list[int] | list[str] | list[list[int]]  # one text or token-id list, or a batch of either


def as_batch(value: Batch) -> list[str | list[int]]:
    """A `Batch` as its list of texts / token-id lists."""
    return [value] if isinstance(value, str) or isinstance(value[0], int) else list(value)


def non_empty_batch(value: Batch, name: str) -> Batch:
    """ValueError for an empty value or a batch holding an empty entry."""
    if not value:
        raise ValueError(f"{name} must not be empty")
    if isinstance(value, list) and isinstance(value[0], (str, list)) and not all(value):
        raise ValueError(f"no {name} of the batch may be empty")
    return value


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage (OpenAI)
    continuous_usage_stats: bool = False  # every chunk with the usage so far (vLLM's); needs include_usage

    @model_validator(mode="after")
    def _continuous_needs_usage(self) -> StreamOptions:
        if self.continuous_usage_stats and not self.include_usage:
            raise ValueError("continuous_usage_stats needs include_usage: true")
        return self


class _SamplingRequest(Strict):
    """Fields both endpoints share; ranges are OpenAI's. vLLM's extensions: top_k, min_p,
    repetition_penalty, min_tokens, stop_token_ids, ignore_eos, allowed_token_ids, bad_words,
    include_stop_str_in_output, skip_special_tokens, truncate_prompt_tokens, priority. Fields left out
    take the model's generation_config.json defaults (temperature, top_p, top_k, min_p,
    repetition_penalty), else OpenAI's."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None  # <= 0 disables
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_TOKEN_LISTS
    )  # token id (a JSON key) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # at most the vocabulary (the engine checks each id)
    bad_words: list[Annotated[str, Field(max_length=MAX_BAD_WORD_CHARS)]] | None = Field(
        None, max_length=MAX_TOKEN_LISTS
    )
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=1)  # keep the prompt's last k tokens
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])  # OpenAI's 64-bit integer
    priority: int = 0  # vLLM's: lower is scheduled first; non-zero needs --scheduling-policy priority
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_LISTS)
    ignore_eos: bool = False
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # accepted and inert: they change nothing this server computes (docs/serving.md)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: Literal[False] | None = None  # nothing is stored; asking for storage is refused

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be in [-100, 100], got {value} for token {key}")
        return bias

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return stop

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: dict[str, float] | None = None,
    ) -> SamplingParams:
        """The engine's SamplingParams; `defaults` (the model's generation config) fill the
        fields the request left out, before OpenAI's own defaults."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        defaults = defaults or {}

        def pick(name: str, fallback: float) -> float:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=int(pick("top_k", -1)),
            min_p=pick("min_p", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words or []),
            min_tokens=self.min_tokens,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=self.structured(),
            priority=self.priority,
        )

    def structured_field(self) -> str | None:
        """The request field that carries the structured output, if any."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return next(
            (
                f
                for f in ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                if getattr(self, f) is not None
            ),
            None,
        )

    def structured(self) -> StructuredOutput | None:
        """The one constraint the request asks for, if any; ApiError (400, naming the field)
        for two at once, a malformed schema, or a JSON-schema keyword the engine would not enforce."""
        asked: dict[str, tuple[str, Any]] = {}
        if self.response_format is not None and self.response_format.type != "text":
            rf = self.response_format
            if rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
                raise ApiError(
                    400,
                    "response_format.json_schema.schema is required for type json_schema",
                    param="response_format.json_schema",
                )
            asked["response_format"] = ("json", rf.json_schema.schema_ if rf.type == "json_schema" else None)
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given = {
                k: v
                for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar))
                if v is not None
            }
            if len(given) != 1:
                raise ApiError(
                    400,
                    "structured_outputs takes exactly one of json, regex, choice, grammar",
                    param="structured_outputs",
                )
            ((kind, value),) = given.items()
            asked["structured_outputs"] = (kind, value)
        for kind in ("json", "regex", "choice", "grammar"):
            if (value := getattr(self, f"guided_{kind}")) is not None:
                asked[f"guided_{kind}"] = (kind, value)
        if not asked:
            return None
        if len(asked) > 1:
            raise ApiError(400, f"one structured output at a time, got {', '.join(asked)}", param=list(asked)[1])
        ((field, (kind, value)),) = asked.items()
        try:
            if kind == "json":
                schema = json.loads(value) if isinstance(value, str) else value
                return StructuredOutput.json_schema(schema)
            if kind == "choice":
                return StructuredOutput.choice(value)
            if not value:
                raise ValueError(f"{kind} must not be empty")
            return StructuredOutput(kind, value)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise ApiError(400, f"{field}: {exc}", param=field) from None

    def truncated(self, prompt_ids: list[int]) -> list[int]:
        """The prompt as the engine gets it: its last truncate_prompt_tokens tokens, if set."""
        return prompt_ids[-self.truncate_prompt_tokens :] if self.truncate_prompt_tokens else prompt_ids

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. A prompt (text or token ids) or a batch of them; each prompt gets
    `n` choices, indexed prompt * n + choice as OpenAI does."""

    prompt: Batch
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1)  # null: the default too (requested_max_tokens)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @property
    def requested_max_tokens(self) -> int:
        """OpenAI's default of 16 when max_tokens is left out or null: clients that send null for
        "not set" must not get a completion that fills the context."""
        return self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_TOKENS

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt: Batch) -> Batch:
        return non_empty_batch(prompt, "prompt")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The batch: one text or token-id list per prompt."""
        return as_batch(self.prompt)


class TextPart(Strict):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"content parts of type {kind!r} are not supported by this server (text parts only)")
        return kind


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    # what an OpenAI response message carries when a client sends it back: accepted and inert
    # (an earlier refusal's text, citations), or accepted only empty (audio, the deprecated function_call)
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as OpenAI dicts for serve.api.tools.render_messages ('developer' is the newer
    name of 'system')."""
    return [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
            "tool_calls": [c.model_dump() for c in m.tool_calls] if m.tool_calls else None,
            "tool_call_id": m.tool_call_id,
        }
        for m in messages
    ]


class ChatTemplating(Strict):
    """How messages (and tools) become a prompt (vLLM's fields): the generation prompt opening
    the assistant's turn, or the last (assistant) message continued in place (assistant
    prefill); a template of the request's own (servers started with
    --trust-request-chat-template) and variables for the template."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)

    def tool_dicts(self) -> list[dict] | None:
        """The tools as serve.api.tools renders them, or None."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class ChatCompletionRequest(ChatTemplating, _SamplingRequest):
    """POST /v1/chat/completions. The messages go through the chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    def tool_mode(self) -> str | None:
        """None without tools; else "none", "auto", "required" or the forced function's name.
        ApiError (400, naming the field) for a choice that cannot be honoured."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice")
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ApiError(400, "tools: function names must be distinct", param="tools")
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ApiError(400, f"tool_choice: no tool named {choice.function.name!r}", param="tool_choice")
            choice = choice.function.name
        if choice not in ("none", "auto") and self.structured_field() is not None:
            raise ApiError(
                400,
                f"tool_choice {choice!r} is itself a structured output: drop {self.structured_field()}",
                param=self.structured_field(),
            )
        return choice

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(ChatTemplating):
    """POST /tokenize (vLLM's): a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class EmbeddingRequest(Strict):
    """POST /v1/embeddings (OpenAI's): texts or token-id lists, one embedding each."""

    model: str | None = None
    input: Batch
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # inert

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Batch) -> Batch:
        if len(as_batch(non_empty_batch(value, "input"))) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return value

    @property
    def inputs(self) -> list[str | list[int]]:
        return as_batch(self.input)


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]
