"""The scheduler: one thread owns the model and runs its continuous batch; requests come and go.

The HTTP handlers run on asyncio's loop. They build their `Member`s (which validates them),
`submit` them as a `Job`, and read the job's events from an asyncio queue. The scheduler thread
admits waiting members into the batch between steps, runs `Batch.step()`, and hands each new
token to its job's loop (`call_soon_threadsafe`). A cancelled job (a client gone) leaves the
batch before the next step. Nothing a request holds can stop the thread: a failing step ends
the jobs in it with an error and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from gptcpu.engine.batch import Batch, Member

log = logging.getLogger("gptcpu.serve")


class QueueFull(Exception):
    pass


class Job:
    """The members (choices) of one request and the queue their events arrive on: (index, token,
    finish) per new token, finish None until the member's last; ("error", message) on a fault."""

    def __init__(self, members: list[Member], loop: asyncio.AbstractEventLoop):
        self.members, self.loop = members, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.open = len(members)          # members not finished yet
        self.submitted = time.perf_counter()
        self.last: dict[int, float] = {}  # member index -> time of its last token

    def _put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # its event loop is closed: the server is gone, nobody is listening
            pass


class Scheduler:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 128, metrics=None):
        self.model = model
        self.batch = Batch(model, max_batch, prefill_chunk)
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting: collections.deque[tuple[Job, int]] = collections.deque()
        self.owner: dict[int, tuple[Job, int]] = {}     # id(member) -> (job, index)
        self.cond = threading.Condition()
        self.stopping = False
        self.deadline: float | None = None              # draining: end everything at this time
        self.thread = threading.Thread(target=self._run, name="gptcpu-scheduler", daemon=True)

    # -- called from the HTTP side ---------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.deadline is not None or self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(job.members) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} of {self.max_queue} sequences "
                                "waiting); retry later")
            self.waiting.extend((job, i) for i in range(len(job.members)))
            self._gauges()
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: its members leave the batch before the next step."""
        if job.open:
            with self.cond:
                job.cancelled = True
                self.cond.notify()

    def drain(self, seconds: float) -> None:
        """Stop taking requests; end whatever still runs `seconds` from now."""
        with self.cond:
            self.deadline = time.monotonic() + seconds
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # -- the scheduler thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.batch and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    self._end_all("length")
                    return
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self._end_all("length")
                    continue
                self._admit()
            if not self.batch:
                continue
            try:
                produced = self.batch.step()
            except Exception as e:  # a bug, not user input (members are validated when built)
                log.exception("a batch step failed")
                self._fail_running(f"{type(e).__name__}: {e}")
                continue
            self._deliver(produced)

    def _admit(self) -> None:  # under the lock
        for m in list(self.batch.members):
            job, _ = self.owner[id(m)]
            if job.cancelled:
                self.batch.remove(m)
                self._close(job, m)
        kept = collections.deque()
        for job, i in self.waiting:
            if job.cancelled:
                job.open -= 1
            elif self.batch.free:
                m = job.members[i]
                self.owner[id(m)] = (job, i)
                self.batch.add(m)
            else:
                kept.append((job, i))
        self.waiting = kept
        self._gauges()

    def _deliver(self, produced) -> None:
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list] = {}   # one wake-up of each loop per step
        for m, token in produced:
            job, i = self.owner[id(m)]
            if self.metrics is not None:
                last = job.last.get(i)
                if last is None:
                    self.metrics.ttft.observe(now - job.submitted)
                else:
                    self.metrics.itl.observe(now - last)
                self.metrics.tokens_out.inc()
            job.last[i] = now
            batches.setdefault(job.loop, []).append((job.events, (i, token, m.finish)))
            if m.finish is not None:
                self._close(job, m)
        for loop, events in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the loop is closed (shutdown)
                pass
        self._gauges()

    def _close(self, job: Job, m: Member) -> None:
        self.owner.pop(id(m), None)
        job.open -= 1

    def _end_all(self, reason: str) -> None:  # under the lock: shutdown
        for m in list(self.batch.members):
            job, i = self.owner[id(m)]
            m.finish = reason
            job._put((i, None, reason))
            self.batch.remove(m)
            self._close(job, m)
        for job, i in self.waiting:
            job.members[i].finish = reason
            job._put((i, None, reason))
            job.open -= 1
        self.waiting.clear()
        self._gauges()

    def _fail_running(self, message: str) -> None:
        with self.cond:
            for m in list(self.batch.members):
                job, _ = self.owner[id(m)]
                job._put(("error", message))
                job.cancelled = True
                self.batch.remove(m)
                self._close(job, m)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(len(self.waiting))
            self.metrics.running.set(len(self.batch))


def _put_all(events) -> None:
    for queue, event in events:
        queue.put_nowait(event)
