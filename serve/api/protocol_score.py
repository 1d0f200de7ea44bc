"""The wire format of text scoring: vLLM's POST /v1/score (`text_1` against `text_2`) and the
rerank request that vLLM, SGLang, Jina and Cohere clients send to /v1/rerank (`query`,
`documents`, `top_n`, `return_documents`), and the bodies both answer.

The requests are strict like serve.api.protocol's (a field this server does not do is a 400
naming it, never a 200 that ignored it); the responses are typed here so that the handlers
(serve.api.score) build them and /openapi.json documents the same models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator

from serve.api.errors import ApiError
from serve.api.protocol import MAX_EMBEDDING_INPUTS, non_empty_batch
from serve.api.protocol_parts import Strict

Texts = str | list[str]  # one text, or a batch of them


def texts_of(value: Texts) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def bounded_texts(value: Texts, name: str) -> Texts:
    """ValueError for no text, an empty text, or more texts than one request may embed."""
    if len(texts_of(non_empty_batch(value, name))) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} texts per request")
    return value


class _Scoring(Strict):
    """What both endpoints share: the model (None: the served encoder) and vLLM's
    `truncate_prompt_tokens` (k: cut every text to its first k tokens, the encoder's special
    tokens included; -1: to the encoder's own limit). Without it, a text over the encoder's limit
    is refused rather than cut: the client decides what to drop."""

    model: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class ScoreRequest(_Scoring):
    """POST /v1/score (vLLM's). Pairs as vLLM forms them: one text_1 against each text_2
    (1-to-N), or text_1[i] against text_2[i] (N-to-N)."""

    text_1: Texts
    text_2: Texts

    @field_validator("text_1", "text_2")
    @classmethod
    def _non_empty(cls, value: Texts, info: ValidationInfo) -> Texts:
        return bounded_texts(value, info.field_name)

    def sides(self) -> tuple[list[str], list[str]]:
        """(text_1, text_2) as lists: one text_1, or as many as text_2. A 400 naming text_2
        otherwise, because no pairing of the two is the one the client meant."""
        first, second = texts_of(self.text_1), texts_of(self.text_2)
        if len(first) > 1 and len(first) != len(second):
            raise ApiError(
                400,
                f"text_2: {len(second)} texts against {len(first)} in text_1; give one text_1 (scored "
                "against each text_2) or as many as text_2 (scored pair by pair)",
                param="text_2",
            )
        return first, second


class RerankDocument(Strict):
    """A document as an object (Cohere's and Jina's form): its text only."""

    text: str


def _document_form(value: Any) -> str:
    return "str" if isinstance(value, str) else "dict"


# a document is a string or an object; told apart by its JSON type, so that a refusal names the
# field inside the object ("documents.0.title") and not pydantic's union member
Document = Annotated[Annotated[str, Tag("str")] | Annotated[RerankDocument, Tag("dict")], Discriminator(_document_form)]


class RerankRequest(_Scoring):
    """POST /v1/rerank (vLLM's, Jina's and Cohere's shape): the documents ordered by their score
    against the query. `top_n`: keep the best n (all without it); `return_documents`: each result
    carries its document's text (vLLM and Jina do by default)."""

    query: str = Field(min_length=1)
    documents: list[Document] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS - 1)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True

    @field_validator("documents")
    @classmethod
    def _no_empty_document(cls, documents: list[str | RerankDocument]) -> list[str | RerankDocument]:
        if not all(doc if isinstance(doc, str) else doc.text for doc in documents):
            raise ValueError("no document may be empty")
        return documents

    @property
    def texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]


# ---- the answers ----------------------------------------------------------------------------


class ScoreUsage(BaseModel):
    prompt_tokens: int  # every text the encoder ran, each counted once
    total_tokens: int


class ScoreData(BaseModel):
    index: int  # the pair's: text_2's index
    object: Literal["score"] = "score"
    score: float  # cosine similarity of the two embeddings, in [-1, 1]


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class DocumentText(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int  # the document's index in the request
    relevance_score: float  # cosine similarity of the document's and the query's embeddings
    document: DocumentText | None = None  # with return_documents (omitted otherwise)


class MetaTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class RerankMeta(BaseModel):
    """Cohere's `meta`: the tokens the request took."""

    tokens: MetaTokens


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]  # best first; equal scores in the documents' order
    usage: ScoreUsage  # vLLM's and Jina's count
    meta: RerankMeta  # Cohere's
