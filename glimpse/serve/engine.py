"""The server's model worker: one thread owns the model; requests wait in a bounded queue and decode
in a running batch (continuous batching).

* Admission: at most `max_pending` requests are admitted (waiting + running); one more is refused
  at once (`QueueFull`, which the API turns into a 429 with Retry-After).  The API `reserve`s a slot
  before it decodes a request's images, so a burst is refused before any decoding, and the slot goes
  with the job (`submit(job, reserved=True)`) or back (`unreserve`).  A request whose client went away
  is `cancel`led: it leaves the queue, or its rows leave the batch before the next decoding step, and
  its slot is free immediately.
* Batching: when the worker is idle it starts a batch with the oldest waiting request and every other
  waiting request that decodes the same way (greedy, or sampling with the same temperature / top-p,
  and the same stop strings), up to `max_batch` rows (a request with n choices is n rows).  Between
  decoding steps, waiting requests that decode the same way join the running batch while rows are
  free: their prompts are prefilled together and their cache rows appended (infer/batch.py:
  `DecodeBatch`); at once while half the rows or more are free, otherwise after at most `JOIN_WAIT`
  steps, so that joins come in groups and a prefill serves several rows.  A
  row leaves at once when it ends (eos, a stop string, its own max_tokens) or its client goes away,
  and a request is answered as soon as its last row ends.  A waiting request that decodes differently
  (or a call) stops the joining: the batch drains, then the next batch starts with it, so it is not
  starved.  Generation is batch-invariant, so a greedy answer is the same whether its request ran
  alone, joined a running batch or was joined; a request with a `seed` runs alone, so that its
  samples depend on the seed only.
* Pipelines without the step API (`open_batch`: the encoder-decoder captioner's and Flamingo's, whose
  rows read cross-attention memories the running batch does not merge) keep whole-batch decoding: the
  group taken above runs `pipeline.complete` to its end, and the longest prompt plus the largest
  max_tokens of a group must fit the context.
* Other model calls (embeddings, explanations, images) go through the same queue, one at a time, when
  no batch is running.

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

# While more than half the batch's rows are busy, a waiting request joins after at most this many steps:
# joins then come in groups, and each prefill serves several rows.
JOIN_WAIT = 4


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
        self.batches = 0  # counters for /health and tests: batches started, rows decoded,
        self.rows = 0
        self.joined = 0  # rows that joined a running batch,
        self.cancelled = 0  # requests whose client left

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
        whole = not hasattr(self.pipeline, "open_batch")  # whole-batch decoding: the context bounds the group
        group, rows = [first], len(first.prompts)
        longest, most = len(first.prompts[0][0]), first.max_new_tokens
        for job in list(self._waiting):
            if job.call is not None or job.key != first.key or rows + len(job.prompts) > self.max_batch:
                continue
            # the batch decodes its longest prompt for its largest max_new_tokens: that must fit
            if whole and max(longest, len(job.prompts[0][0])) + max(most, job.max_new_tokens) > self.context_length:
                continue
            self._waiting.remove(job)
            group.append(job)
            rows += len(job.prompts)
            longest, most = max(longest, len(job.prompts[0][0])), max(most, job.max_new_tokens)
        return group

    def _joiners(self, key: tuple, free: int) -> list[Job]:
        """The waiting jobs, oldest first, that join a running batch of `key` in `free` rows: up to the
        first one that decodes differently or does not fit (holding the lock)."""
        group = []
        for job in self._waiting:
            if self._stop or job.call is not None or job.key != key or len(job.prompts) > free:
                break
            group.append(job)
            free -= len(job.prompts)
        for job in group:
            self._waiting.remove(job)
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
                elif hasattr(self.pipeline, "open_batch"):
                    self._decode(group)
                else:
                    self._generate(group)
            except Exception as e:  # reported to the requests; the worker lives on
                for job in group:
                    _report(job, None, e)
            finally:
                with self._cond:
                    for job in group:
                        self._release(job)

    def _finish(self, job: Job, result, error) -> None:
        _report(job, result, error)
        with self._cond:
            self._release(job)

    def _decode(self, group: list[Job]) -> None:
        """Continuous batching: a running batch that jobs join between steps and leave when done.
        Every job of `group` (taken over from the caller) and every joiner is answered and released here."""
        taken, batch, key = list(group), None, group[0].key  # taken: not yet in the batch (or answered)
        group.clear()
        rows: dict[int, tuple[Job, int]] = {}  # a running row's handle -> (its job, its choice)
        out: dict[Job, list[list[int]]] = {}  # a running job's tokens per choice
        left: dict[Job, int] = {}  # a running job's rows still decoding

        def admit(joining: list[Job]) -> None:
            prompts = [p for job in joining for p in job.prompts]
            try:
                handles = batch.add_prompts(prompts, [job.max_new_tokens for job in joining for _ in job.prompts])
            except Exception as e:
                if len(joining) > 1:  # find the one at fault: the others join without it
                    for job in joining:
                        admit([job])
                else:
                    self._finish(joining[0], None, e)
                return
            it = iter(handles)
            for job in joining:
                out[job], left[job] = [[] for _ in job.prompts], len(job.prompts)
                rows.update((next(it), (job, choice)) for choice in range(len(job.prompts)))
            self.rows += len(prompts)

        def leave(job: Job) -> None:  # its client is gone
            mine = [h for h, (j, _) in rows.items() if j is job]
            batch.remove(mine)
            for h in mine:
                del rows[h]
            del out[job], left[job]
            self._finish(job, None, None)  # nothing to report; frees the slot if `cancel` did not

        try:
            batch = self.pipeline.open_batch(**taken[0].options)
            self.batches += 1
            admit(taken)
            taken = []
            waited = 0
            while True:
                free = self.max_batch - len(rows)
                if out and free and (2 * free >= self.max_batch or waited >= JOIN_WAIT):
                    # the batch runs: waiting jobs that decode the same way join it
                    with self._cond:
                        taken = self._joiners(key, free)
                    waited = 0
                    if taken:
                        self.joined += sum(len(j.prompts) for j in taken)
                        admit(taken)
                        taken = []
                elif free and self._waiting:
                    waited += 1
                for job in [j for j in out if j.cancelled.is_set()]:
                    leave(job)
                if not rows:
                    return
                events, ended = batch.choose()
                for h, token in events:
                    job, choice = rows[h]
                    out[job][choice].append(token)
                    if job.on_token is not None and not job.cancelled.is_set():
                        try:
                            job.on_token(choice, token)
                        except Exception:  # the request's side is gone (its loop closed): stop its rows
                            job.cancelled.set()
                for h in ended:
                    job, _ = rows.pop(h)
                    left[job] -= 1
                    if not left[job]:  # answered as soon as its last row ends
                        tokens = out.pop(job)
                        del left[job]
                        self._finish(job, tokens, None)
                batch.advance()
        except Exception as e:  # the batch is lost: each job in it that is still unanswered gets the error
            for job in taken + list(out):
                if not job.released:
                    self._finish(job, None, e)
        finally:
            if batch is not None:
                batch.close()

    def _generate(self, group: list[Job]) -> None:
        """Whole-batch decoding, for pipelines without `open_batch`."""
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
