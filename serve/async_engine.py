"""The blocking LLMEngine behind an asyncio API, and the backend Protocol the server talks to.

LLMEngine is single-threaded: only one thread may touch it. So one thread owns it and loops
"admit new requests, apply aborts, step()" (`run`); the event loop never calls it. Under
`ministack serve` that thread is the process's main thread and the HTTP server runs beside it
(serve.cli): with libgomp (torch's OpenMP on Linux), once the main thread has run parallel
torch ops (loading the model does), every parallel region another thread starts pays tens of
microseconds more (an elementwise op of 16 x 2,304 floats: 3.6 -> 24 us; SmolLM2's decode step
of 16 sequences: 42 -> 55 ms; 2-core EPYC, measured), so a step loop on a second thread lost
~20% of the engine's throughput. Embedded elsewhere (tests), `thread=True` starts a background
thread for it.
Requests cross into that thread through an inbox under a lock; outputs cross back through a
per-request asyncio.Queue filled with `loop.call_soon_threadsafe` (asyncio queues are not
thread-safe). A consumer that stops iterating (client disconnect, task cancellation) aborts
its request, which frees its KV blocks at the engine's next iteration.

Admission is bounded, by requests and by tokens: a request that would make more than
`max_queue` requests wait (queued here or in the scheduler's waiting queue), or more than
`max_queued_tokens` prompt tokens (a single 8k prompt is tens of seconds of prefill on two cores,
so counting requests alone admits minutes of work), is refused with `Overloaded` instead of
growing a backlog whose tail would time out anyway; the server answers 429 with a Retry-After
estimated from the queued tokens and the engine's measured prefill rate. A request still
unscheduled `max_queue_time` seconds after it arrived is dropped with `QueueTimeout` (503)
rather than answered late.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from serve.engine.llm_engine import LLMEngine
from serve.engine.outputs import EngineStats, RequestOutput
from serve.engine.sampling_params import SamplingParams
from serve.engine.structured import StructuredOutput


class Overloaded(RuntimeError):
    """Too much work already waits (`why`); retry after `retry_after` seconds."""

    prefix = "engine is overloaded"

    def __init__(self, why: str, retry_after: int = 1) -> None:
        super().__init__(f"{self.prefix}: {why}; retry in {retry_after} s")
        self.retry_after = retry_after


class QueueTimeout(Overloaded):
    """A request waited longer than the queue deadline without being scheduled."""

    prefix = "request dropped from the queue"


def retry_after(queued_tokens: int, prefill_tokens_per_s: float) -> int:
    """Seconds until the queued prompt tokens are prefilled at the measured rate (1..3600; 1
    before anything was measured)."""
    if prefill_tokens_per_s <= 0:
        return 1
    return max(1, min(3600, math.ceil(queued_tokens / prefill_tokens_per_s)))


class Backend(Protocol):
    """What the HTTP server needs from an inference engine (ministack's or vLLM's)."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a Hugging Face tokenizer with a chat template
    sampling_defaults: dict[str, float]  # the model's generation_config.json values for fields a request leaves out

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs as they come, the last one `finished`. Raises Overloaded at
        once when the queue is full; the request is submitted when the stream is first iterated
        (one never iterated costs nothing). The stream raises ValueError if the engine refuses
        the request (e.g. prompt too long). Leaving the stream early aborts it."""
        ...

    def stats(self) -> EngineStats: ...

    def check_structured(self, structured: StructuredOutput) -> None:
        """ValueError when the backend cannot enforce `structured` (its grammar engine refuses it)."""
        ...

    def healthy(self) -> bool:
        """False once the engine can no longer serve (its step loop died): /health answers 503."""
        ...


@dataclass
class _Pending:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Runs an LLMEngine's step loop in one background thread; `generate` streams its outputs."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256, thread: bool = True, max_queued_tokens: int | None = None,
                 max_queue_time: float | None = None) -> None:
        """`thread`: run the step loop on a background thread now; False: the caller runs `run()`
        on the thread it chooses (the one that loaded the model, for libgomp's sake).
        `max_queued_tokens` / `max_queue_time` (seconds): None for no limit."""
        for name, value in (("max_queue", max_queue), ("max_queued_tokens", max_queued_tokens), ("max_queue_time", max_queue_time)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.max_queued_tokens, self.max_queue_time = max_queued_tokens, max_queue_time
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.sampling_defaults = engine.sampling_defaults
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: list[_Pending] = []  # submitted, not yet added to the engine
        self._aborts: list[_Pending] = []  # streams closed before their end
        self._queues: dict[str, _Pending] = {}  # request id -> where its outputs go; engine thread only
        self._stats = engine.stats()  # snapshot after the last step; read from any thread
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False  # the step loop has ended (closed, or died)
        if thread:
            self._thread = threading.Thread(target=self.run, name="engine-step", daemon=True)
            self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """Check room now (raising Overloaded at once if the queue is full); the request is
        submitted when the stream is first iterated, so a stream never iterated costs nothing."""
        with self._cond:
            if self._error is not None:
                raise RuntimeError("the engine thread died") from self._error
            waiting = len(self._inbox) + self._stats.num_waiting
            queued = sum(len(p.prompt_ids) for p in self._inbox) + self._stats.num_waiting_tokens
            wait = retry_after(queued + len(prompt_ids), self._stats.prefill_tokens_per_s)
            if waiting >= self.max_queue:
                raise Overloaded(f"{waiting} requests are already waiting (--max-queue {self.max_queue})", wait)
            # a queue with room for nothing else still takes one prompt, however long
            if self.max_queued_tokens is not None and queued and queued + len(prompt_ids) > self.max_queued_tokens:
                raise Overloaded(f"{queued:,} prompt tokens are already waiting and this request brings {len(prompt_ids):,} "
                                 f"(--max-num-queued-tokens {self.max_queued_tokens:,})", wait)
        return self._stream(request_id, prompt_ids, params)

    async def _stream(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        pending = _Pending(request_id, prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if self._error is not None:
                raise RuntimeError("the engine thread died") from self._error
            self._inbox.append(pending)
            self._cond.notify()
        finished = False
        try:
            while not finished:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort(pending)

    def _abort(self, pending: _Pending) -> None:
        with self._cond:
            self._aborts.append(pending)
            self._cond.notify()

    def healthy(self) -> bool:
        return self._error is None and not self._stopped

    def stats(self) -> EngineStats:
        with self._cond:
            return dataclasses.replace(self._stats, num_waiting=self._stats.num_waiting + len(self._inbox))

    def check_structured(self, structured: StructuredOutput) -> None:
        """Compile it now (xgrammar's compiler caches: the engine thread then finds it compiled)."""
        self.engine.grammars().compile(structured)

    def close(self) -> None:
        """Stop the step loop (requests in flight are dropped); joins the background thread if any."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- engine-thread side ----------------------------------------------------------------

    def run(self) -> None:
        """The step loop, on the calling thread, until `close()`; re-raises what killed it after
        telling every waiting request."""
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._inbox or self._aborts or self.engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._closed:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                for pending in inbox:  # before aborts: a client may leave before its request is admitted
                    self._admit(pending)
                for pending in aborts:  # this stream's request only: a refused duplicate id must not end the first
                    if self._queues.get(pending.request_id) is pending:
                        del self._queues[pending.request_id]
                        self.engine.abort_request(pending.request_id)
                if self.max_queue_time is not None:
                    self._drop_late()
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                stats = self.engine.stats()
                with self._cond:
                    self._stats = stats
                batches: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, RequestOutput]]] = {}
                for output in outputs:
                    pending = self._queues.get(output.request_id)
                    if pending is None:
                        continue
                    if output.finished:
                        del self._queues[output.request_id]
                    batches.setdefault(pending.loop, []).append((pending, _snapshot(output)))
                for loop, items in batches.items():  # one wake-up of each event loop per step
                    _call_soon(loop, _put_all, items)
        except BaseException as exc:  # noqa: BLE001 - every waiting request must hear about it
            with self._cond:
                self._error = exc
                orphans = list(self._queues.values()) + self._inbox
            for pending in orphans:
                _deliver(pending, RuntimeError(f"engine failed: {exc!r}"))
            raise
        finally:
            self._stopped = True
            self.engine.close()

    def _drop_late(self) -> None:
        """Abort the requests still unscheduled past the queue deadline, telling their streams."""
        now = time.time()
        for request_id, pending in list(self._queues.items()):
            request = self.engine.requests.get(request_id)
            if request is not None and request.first_scheduled_time is None and now - request.arrival_time > self.max_queue_time:
                del self._queues[request_id]
                self.engine.abort_request(request_id)
                stats = self.engine.stats()
                wait = retry_after(stats.num_waiting_tokens, stats.prefill_tokens_per_s)
                _deliver(pending, QueueTimeout(f"the request waited {now - request.arrival_time:.1f} s without being scheduled "
                                               f"(--max-queue-time {self.max_queue_time:g} s)", wait))

    def _admit(self, pending: _Pending) -> None:
        try:
            self.engine.add_request(pending.request_id, pending.prompt_ids, pending.params)
        except ValueError as exc:
            _deliver(pending, exc)
            return
        self._queues[pending.request_id] = pending


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy safe to read on another thread: the engine keeps appending to a sequence's
    logprobs list in later steps, while the consumer reads this step's view of it."""
    outputs = [dataclasses.replace(c, logprobs=list(c.logprobs)) if c.logprobs is not None else c for c in output.outputs]
    return dataclasses.replace(output, outputs=outputs)


def _deliver(pending: _Pending, item: RequestOutput | BaseException) -> None:
    """Hand an output (or the error ending the request) to its consumer's event loop."""
    _call_soon(pending.loop, pending.queue.put_nowait, item)


def _put_all(items: list[tuple[_Pending, RequestOutput]]) -> None:
    for pending, output in items:
        pending.queue.put_nowait(output)


def _call_soon(loop: asyncio.AbstractEventLoop, callback, arg) -> None:
    try:
        loop.call_soon_threadsafe(callback, arg)
    except RuntimeError:  # that loop has closed: nobody is listening any more
        pass
