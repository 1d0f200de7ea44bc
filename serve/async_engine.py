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

A request enters the inbox when `generate` is called, under the same lock that counts the
queue, so `max_queue` is a hard cap however many handlers submit at once; the stream it returns
aborts the request when closed (or dropped) before its end, whether or not it was ever iterated.
A request that fails on its own (nothing left to sample, a grammar fault) or that the engine
refuses ends its stream with `RequestFailed` / ValueError; the loop goes on. Only a fault of the
step itself ends the loop: every request hears `EngineDead`, and /health turns 503.

Admission is bounded, by requests and by tokens: a request that would make more than
`max_queue` requests wait (queued here or in the scheduler's waiting queue), or more than
`max_queued_tokens` prompt tokens (a single 8k prompt is tens of seconds of prefill on two cores,
so counting requests alone admits minutes of work), is refused with `Overloaded` instead of
growing a backlog whose tail would time out anyway; the server answers 429 with a Retry-After
estimated from the queued tokens and the engine's measured prefill rate. A request still
unscheduled `max_queue_time` seconds after it arrived is dropped with `QueueTimeout` (503)
rather than answered late.

Memory: glibc's malloc keeps what a burst of requests freed (tensors of every batch shape,
tokenizer buffers) in its heaps instead of returning it, so a server's RSS climbed ~12 % over a
5-minute soak and stayed there although nothing leaked (malloc_trim(0) gave it all back). The
step loop therefore trims the heap when it has gone idle after serving, at most every
TRIM_INTERVAL_S, never while a request is in flight (a trim of a 2 GB heap costs milliseconds).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import math
import threading
import time
from collections.abc import AsyncIterator
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


TRIM_INTERVAL_S = 5.0


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS): what gives freed heap pages back."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class RequestFailed(RuntimeError):
    """The engine ended this request with an error of its own (RequestOutput.error); others go on."""


class EngineDead(RuntimeError):
    """The step loop has ended (it failed, or the server is shutting down): nothing more is served."""


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

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come, the last one `finished`. Raises Overloaded at
        once when the queue is full. The stream raises ValueError if the engine refuses the
        request (e.g. prompt too long), RequestFailed / EngineDead if it fails. Closing the
        stream (`aclose`) before its end aborts the request."""
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

    def __init__(
        self,
        engine: LLMEngine,
        max_queue: int = 256,
        thread: bool = True,
        max_queued_tokens: int | None = None,
        max_queue_time: float | None = None,
    ) -> None:
        """`thread`: run the step loop on a background thread now; False: the caller runs `run()`
        on the thread it chooses (the one that loaded the model, for libgomp's sake).
        `max_queued_tokens` / `max_queue_time` (seconds): None for no limit."""
        for name, value in (
            ("max_queue", max_queue),
            ("max_queued_tokens", max_queued_tokens),
            ("max_queue_time", max_queue_time),
        ):
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
        self._closing: str | None = None  # fail_all's reason, until the engine thread has failed them
        self._admitting = 0  # taken from the inbox by the engine thread, not yet in the scheduler's count
        self._trim, self._heap_dirty, self._last_trim = _malloc_trim(), False, 0.0  # engine thread only
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False  # the step loop has ended (closed, or died)
        if thread:
            self._thread = threading.Thread(target=self.run, name="engine-step", daemon=True)
            self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue the request now, or raise Overloaded at once if the queue is full (EngineDead
        once the loop has ended); its outputs come through the returned stream."""
        with self._cond:
            if self._error is not None or self._stopped or self._closed or self._closing is not None:
                raise EngineDead(self._dead_reason())
            waiting = self._waiting()
            queued = sum(len(p.prompt_ids) for p in self._inbox) + self._stats.num_waiting_tokens
            wait = retry_after(queued + len(prompt_ids), self._stats.prefill_tokens_per_s)
            if waiting >= self.max_queue:
                raise Overloaded(f"{waiting} requests are already waiting (--max-queue {self.max_queue})", wait)
            # a queue with room for nothing else still takes one prompt, however long
            if self.max_queued_tokens is not None and queued and queued + len(prompt_ids) > self.max_queued_tokens:
                raise Overloaded(
                    f"{queued:,} prompt tokens are already waiting and this request brings {len(prompt_ids):,} "
                    f"(--max-num-queued-tokens {self.max_queued_tokens:,})",
                    wait,
                )
            pending = _Pending(request_id, prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue())
            self._inbox.append(pending)
            self._cond.notify()
        return RequestStream(self, pending)

    def _waiting(self) -> int:
        """Requests not yet scheduled, counted conservatively (caller holds the lock): the inbox,
        those the engine thread took from it this iteration, and the scheduler's waiting queue as
        of the last step (some of which the running step may be scheduling right now)."""
        return len(self._inbox) + self._admitting + self._stats.num_waiting

    def _dead_reason(self) -> str:
        if self._error is not None:
            return f"the engine failed and serves no more requests: {self._error!r}"
        return self._closing or "the server is shutting down"

    def _abort(self, pending: _Pending) -> None:
        with self._cond:
            self._aborts.append(pending)
            self._cond.notify()

    def fail_all(self, reason: str) -> None:
        """End every request in flight now with EngineDead(`reason`) and admit no more (a
        shutdown's grace period has run out): their handlers answer with that error at once."""
        with self._cond:
            self._closing = reason
            self._cond.notify()

    def healthy(self) -> bool:
        return self._error is None and not self._stopped

    def stats(self) -> EngineStats:
        with self._cond:
            return dataclasses.replace(self._stats, num_waiting=self._waiting())

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
                    self._wait_for_work()
                    if self._closed:
                        return
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    self._admitting, closing = len(inbox), self._closing
                for pending in inbox:  # before aborts: a client may leave before its request is admitted
                    self._admit(pending)
                for pending in aborts:  # this stream's request only: a refused duplicate id must not end the first
                    if self._queues.get(pending.request_id) is pending:
                        del self._queues[pending.request_id]
                        self.engine.abort_request(pending.request_id)
                if closing is not None:
                    self._fail_in_flight(EngineDead(closing))
                if self.max_queue_time is not None:
                    self._drop_late()
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                stats = self.engine.stats()
                with self._cond:
                    self._stats, self._admitting = stats, 0
                self._hand_out(outputs)
                self._heap_dirty = self._heap_dirty or bool(outputs)
        except BaseException as exc:  # noqa: BLE001 - every waiting request must hear about it
            with self._cond:
                self._error = exc
                orphans = list(self._queues.values()) + self._inbox
                self._inbox = []
            for pending in orphans:
                _deliver(pending, EngineDead(f"the engine failed: {exc!r}"))
            raise
        finally:
            self._stopped = True
            self.engine.close()

    def _wait_for_work(self) -> None:
        """Block (lock held) until there is something to do; while idle after serving, trim the
        heap once TRIM_INTERVAL_S has passed since the last trim (module docstring), lock released."""
        while not (self._closed or self._inbox or self._aborts or self.engine.has_unfinished_requests()):
            if not self._heap_dirty or self._trim is None:
                self._cond.wait()
                continue
            delay = self._last_trim + TRIM_INTERVAL_S - time.monotonic()
            if delay > 0:
                self._cond.wait(delay)
                continue
            self._cond.release()  # a submission must not wait on the trim
            try:
                self._trim(0)
            finally:
                self._cond.acquire()
            self._heap_dirty, self._last_trim = False, time.monotonic()

    def _hand_out(self, outputs: list[RequestOutput]) -> None:
        """Each output to its stream's event loop, one wake-up of each loop per step; a failed
        request's stream gets its error instead: ValueError (a 400) when its own settings left it
        nothing to generate, else RequestFailed."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, RequestOutput | BaseException]]] = {}
        for output in outputs:
            pending = self._queues.get(output.request_id)
            if pending is None:
                continue
            if output.finished:
                del self._queues[output.request_id]
            item = _snapshot(output)
            if output.error is not None:
                item = (ValueError if output.error.invalid else RequestFailed)(output.error.message)
            batches.setdefault(pending.loop, []).append((pending, item))
        for loop, items in batches.items():
            _call_soon(loop, _put_all, items)

    def _fail_in_flight(self, error: EngineDead) -> None:
        """Abort every request the engine holds, telling each stream `error` (engine thread)."""
        for request_id, pending in list(self._queues.items()):
            del self._queues[request_id]
            self.engine.abort_request(request_id)
            _deliver(pending, error)

    def _drop_late(self) -> None:
        """Abort the requests still unscheduled past the queue deadline, telling their streams."""
        now = time.time()
        for request_id, pending in list(self._queues.items()):
            request = self.engine.requests.get(request_id)
            if (
                request is not None
                and request.first_scheduled_time is None
                and now - request.arrival_time > self.max_queue_time
            ):
                del self._queues[request_id]
                self.engine.abort_request(request_id)
                stats = self.engine.stats()
                wait = retry_after(stats.num_waiting_tokens, stats.prefill_tokens_per_s)
                _deliver(
                    pending,
                    QueueTimeout(
                        f"the request waited {now - request.arrival_time:.1f} s without being scheduled "
                        f"(--max-queue-time {self.max_queue_time:g} s)",
                        wait,
                    ),
                )

    def _admit(self, pending: _Pending) -> None:
        """Hand a request to the engine; one it refuses (ValueError) or fails to take (anything
        else: a fault of that request's, e.g. its grammar) ends that stream only."""
        if self._closing is not None:
            _deliver(pending, EngineDead(self._closing))
            return
        try:
            self.engine.add_request(pending.request_id, pending.prompt_ids, pending.params)
        except ValueError as exc:
            _deliver(pending, exc)
            return
        except Exception as exc:  # noqa: BLE001 - add_request queues nothing until it cannot fail
            _deliver(pending, RequestFailed(f"the engine could not take the request: {exc!r}"))
            return
        self._queues[pending.request_id] = pending


class RequestStream:
    """One request's outputs, as an async iterator. Closing it before the last output (a client
    that left, a batch refused half-way) aborts the request; so does dropping it unclosed."""

    def __init__(self, engine: AsyncEngine, pending: _Pending) -> None:
        self._engine, self._pending, self._done = engine, pending, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._pending.queue.get()
        except BaseException:  # cancelled while waiting: the consumer has gone
            self.close()
            raise
        if isinstance(item, BaseException):
            self._done = True  # the engine side has already let go of it
            raise item
        self._done = item.finished
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._abort(self._pending)

    def __del__(self) -> None:
        self.close()


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy safe to read on another thread: the engine keeps appending to a sequence's
    logprobs list in later steps, while the consumer reads this step's view of it."""
    outputs = [
        dataclasses.replace(c, logprobs=list(c.logprobs)) if c.logprobs is not None else c for c in output.outputs
    ]
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
