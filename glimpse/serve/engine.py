"""The server's model worker: one thread owns the model; requests wait in a bounded queue and are
batched.

* Admission: at most `max_pending` requests are admitted (waiting + running); one more is refused
  at once (`QueueFull`, which the API turns into a 429 with Retry-After).  The API `reserve`s a slot
  before it decodes a request's images, so a burst is refused before any decoding, and the slot goes
  with the job (`submit(job, reserved=True)`) or back (`unreserve`).  A request whose client went away
  is `cancel`led: it leaves the queue, or its rows stop at the next decoding step, and its slot is
  free immediately.
* Batching: whenever the worker is free it takes the oldest waiting request and every other waiting
  request that decodes the same way (greedy, or sampling with the same temperature / top-p, and the
  same stop strings) up to `max_batch` rows (a request with n choices is n rows), and runs them as
  one left-padded batch.  Generation is batch-invariant (infer/generate.py), so a greedy answer is
  the same whether its request was batched or not; a request with a `seed` runs alone, so that its
  samples depend on the seed only.  Each row stops at its own max_tokens.
* Other model calls (embeddings) go through the same queue, one at a time.

Results and streamed tokens reach the waiting coroutine through thread-safe callbacks.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """Every slot is taken: come back later."""


@dataclass(eq=False)  # jobs are compared by identity (queue removal)
class Job:
    """One request.  A generation job has `prompts` (one (ids, images) per choice) and decoding
    `options`; a call job has `call`.  `on_token(choice, id)` streams; `on_done(result, error)`
    is called exactly once, from the worker thread (or from `cancel`)."""

    on_done: Callable
    prompts: list = field(default_factory=list)
    max_new_tokens: int = 0
    options: dict = field(default_factory=dict)
    on_token: Callable | None = None
    call: Callable | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False
    key: tuple = ()


_alone = itertools.count()


def batch_key(options: dict) -> tuple:
    """Jobs with equal keys can share a batch (see the module docstring)."""
    if options.get("seed") is not None and options.get("do_sample"):
        return ("alone", next(_alone))
    sampling = (options["temperature"], options["top_p"]) if options.get("do_sample") else ()
    return (bool(options.get("do_sample")), sampling, tuple(options.get("stop_strings", ())))


def _report(job: Job, result, error) -> None:
    """Hand a job its outcome, unless its client is gone; a failing callback never kills the worker."""
    if job.cancelled.is_set():
        return
    try:
        job.on_done(result, error)
    except Exception:
        pass


class Engine:
    def __init__(self, pipeline, max_batch: int = 8, max_pending: int = 64):
        self.pipeline, self.max_batch, self.max_pending = pipeline, max_batch, max_pending
        self.context_length = getattr(pipeline, "context_length", None) or 0
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._admitted = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self.batches = 0  # counters for /health and tests
        self.rows = 0
        self.cancelled = 0

    # -- the request side ------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self._admitted

    def reserve(self) -> None:
        """Take a slot for a request about to be prepared, or raise QueueFull."""
        with self._cond:
            if self._admitted >= self.max_pending:
                raise QueueFull
            self._admitted += 1

    def unreserve(self) -> None:
        """Give back a reserved slot whose request never became a job (it was refused)."""
        with self._cond:
            self._admitted -= 1

    def submit(self, job: Job, reserved: bool = False) -> None:
        """Queue a job, in the slot `reserve` took for it or in a new one (QueueFull if none is left)."""
        if job.call is None:
            job.key = batch_key(job.options)
        if not reserved:
            self.reserve()
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="glimpse-engine", daemon=True)
                self._thread.start()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop its rows, and free its slot."""
        with self._cond:
            if job.released:
                return  # already answered
            job.cancelled.set()
            self.cancelled += 1
            if job in self._waiting:
                self._waiting.remove(job)
            self._release(job)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _release(self, job: Job) -> None:  # holding the lock
        if not job.released:
            job.released = True
            self._admitted -= 1

    # -- the worker ------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """The oldest job and the waiting jobs that can join its batch (holding the lock)."""
        first = self._waiting.popleft()
        if first.call is not None:
            return [first]
        group, rows = [first], len(first.prompts)
        longest, most = len(first.prompts[0][0]), first.max_new_tokens
        for job in list(self._waiting):
            if job.call is not None or job.key != first.key or rows + len(job.prompts) > self.max_batch:
                continue
            # the batch decodes its longest prompt for its largest max_new_tokens: that must fit
            if max(longest, len(job.prompts[0][0])) + max(most, job.max_new_tokens) > self.context_length:
                continue
            self._waiting.remove(job)
            group.append(job)
            rows += len(job.prompts)
            longest, most = max(longest, len(job.prompts[0][0])), max(most, job.max_new_tokens)
        return group

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                group = self._take()
            try:
                if group[0].call is not None:
                    _report(group[0], group[0].call(), None)
                else:
                    self._generate(group)
            except Exception as e:  # reported to the requests; the worker lives on
                for job in group:
                    _report(job, None, e)
            finally:
                with self._cond:
                    for job in group:
                        self._release(job)

    def _generate(self, group: list[Job]) -> None:
        rows = [(job, choice) for job in group for choice in range(len(job.prompts))]
        counts = [0] * len(rows)

        def on_token(row: int, token: int) -> None:
            counts[row] += 1
            job, choice = rows[row]
            if job.on_token is not None and not job.cancelled.is_set():
                try:
                    job.on_token(choice, token)
                except Exception:  # the request's side is gone (its loop closed): stop its rows
                    job.cancelled.set()

        def cancelled(row: int) -> bool:
            job = rows[row][0]
            return job.cancelled.is_set() or counts[row] >= job.max_new_tokens

        options = dict(group[0].options)
        self.batches += 1
        self.rows += len(rows)
        out = self.pipeline.complete([p for job in group for p in job.prompts],
                                     max(job.max_new_tokens for job in group), on_token=on_token,
                                     cancelled=cancelled, **options)
        start = 0
        for job in group:
            tokens = [t[: job.max_new_tokens] for t in out[start : start + len(job.prompts)]]
            start += len(job.prompts)
            _report(job, tokens, None)
