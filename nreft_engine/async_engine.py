"""AsyncEngine: concurrent requests from asyncio callers, served by one Engine in one continuous batch.

Each `generate` coroutine is one request; requests that arrive while a batch runs join it at the next step.
The step loop runs in a background thread that holds the engine's lock while it has work (so synchronous
`Engine.generate` calls from other threads wait their turn) and hands each request its RequestOutput.
The skip set is fixed per epoch (e.g. a training step): `start_epoch` draws it, the requests of that epoch
run with it, and a request of the next epoch waits until the last one of the previous epoch has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nreft_engine.engine import Engine, Prompt
from nreft_engine.outputs import GenerationStats, RequestOutput
from nreft_engine.sampling_params import SamplingParams
from nreft_engine.sequence import Sequence, SequenceStatus
from nreft_engine.session import GenerationSession, make_group, request_output
from nreft_engine.skip import LayerPlan, SkipPolicy, SkipSpec, resolve_plan

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    index: int
    group: list[Sequence]
    plan: LayerPlan
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    aborted: bool = False
    settled: bool = False  # its output (or error) is handed over; its future may also be cancelled


class AsyncEngine:
    """Serves concurrent `generate` calls over `engine` in one continuous batch, with the skip set of the
    current epoch: `skip` as a SkipPolicy draws one per epoch (`policy.plan_for(num_layers, epoch, rank)`),
    fixed layer ids or a LayerPlan stay, None runs the full model."""

    def __init__(self, engine: Engine, skip: SkipSpec = None, rank: int = 0):
        self.engine = engine
        self.rank = rank
        self.epoch = 0
        self._skip = skip
        self.plan = self._draw(0, skip)
        self.last_stats: GenerationStats | None = None  # of the latest batch to drain
        self._seq_ids = itertools.count()
        self._cond = threading.Condition(threading.RLock())  # guards the queue and the requests in flight
        self._pending: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}  # in flight: pending or admitted
        self._thread: threading.Thread | None = None

    def set_skip(self, skip: SkipSpec, epoch: int | None = None) -> LayerPlan:
        """Use `skip` from now on, starting epoch `epoch` (default: the current one again)."""
        epoch = self.epoch if epoch is None else epoch
        self.plan, self._skip, self.epoch = self._draw(epoch, skip), skip, epoch
        return self.plan

    def start_epoch(self, epoch: int) -> LayerPlan:
        """Draw the skip set of `epoch`; requests submitted from now on run with it (those in flight keep
        theirs)."""
        self.plan = self._draw(epoch, self._skip)
        self.epoch = epoch
        logger.debug("epoch %d: skipped layers %s", epoch, self.plan.skipped)
        return self.plan

    def _draw(self, epoch: int, skip: SkipSpec) -> LayerPlan:
        if isinstance(skip, SkipPolicy):
            return skip.plan_for(self.engine.num_layers, epoch, self.rank)
        return resolve_plan(skip, self.engine.num_layers)

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        *, index: int = 0,
    ) -> RequestOutput:
        """Sample `params.n` completions of `prompt` in the shared batch. `index` is the prompt's position in
        an `Engine.generate` call to reproduce: the same seed and index give the same samples. Bad input
        raises here; an aborted request returns what it had sampled, with finish_reason "abort"."""
        ids, params = self.engine.check_request(prompt, params)
        request_id = uuid.uuid4().hex if request_id is None else request_id
        loop = asyncio.get_running_loop()
        group = make_group(self._seq_ids, index, ids, params)
        text = prompt if isinstance(prompt, str) else None
        request = _Request(request_id, text, index, group, self.plan, loop.create_future(), loop)
        with self._cond:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight; give each request its own")
            self._requests[request_id] = request
            self._pending.append(request)
            self._start_thread()
            self._cond.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def abort(self, request_id: str) -> bool:
        """Abort a request in flight at the next step (its blocks are freed); False if it is not in flight."""
        with self._cond:
            request = self._requests.get(request_id)
            if request is not None:
                request.aborted = True
                self._cond.notify()
            return request is not None

    def abort_all(self) -> int:
        """Abort every request in flight; returns how many."""
        with self._cond:
            for request in self._requests.values():
                request.aborted = True
            self._cond.notify()
            return len(self._requests)

    @property
    def num_in_flight(self) -> int:
        return len(self._requests)

    async def sleep(self) -> None:
        """Release the engine's KV cache once the running batch drains (`Engine.sleep`, off the event loop);
        requests sent before `wake_up` fail with a message saying so."""
        await asyncio.to_thread(self.engine.sleep)

    async def wake_up(self) -> None:
        """Reserve the KV cache again (`Engine.wake_up`)."""
        await asyncio.to_thread(self.engine.wake_up)

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nreft-async-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        """The background thread: serve while requests wait, holding the engine's lock meanwhile."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            with self.engine.lock:
                self._serve()

    def _serve(self) -> None:
        """One session per run of pending requests with the same skip set, until none waits."""
        while True:
            with self._cond:
                self._drop_aborted_pending()
                if not self._pending:
                    return
                plan = self._pending[0].plan
            try:
                session = self.engine.open_session(plan)
            except Exception as error:  # e.g. asleep: every request of this plan fails, the loop goes on
                with self._cond:
                    self._fail(self._take_pending(plan), error)
                continue
            admitted: list[_Request] = []
            try:
                with torch.inference_mode():
                    self._run(session, admitted)
            except Exception as error:
                logger.exception("step failed; failing the %d requests of its batch", len(admitted))
                self._fail([r for r in admitted if not r.settled], error)
            self.last_stats = session.finish()

    def _run(self, session: GenerationSession, admitted: list[_Request]) -> None:
        """Steps until the session's batch drains, admitting requests of its plan and applying aborts."""
        by_seq: dict[int, _Request] = {}
        while True:
            with self._cond:
                self._drop_aborted_pending()
                new = self._take_pending(session.plan)
                aborted = [r for r in admitted if r.aborted and not r.settled]
            for request in new:
                try:
                    session.add(request.index, request.group)
                except ValueError as error:
                    self._fail([request], error)
                    continue
                admitted.append(request)
                by_seq.update((seq.seq_id, request) for seq in request.group)
            for request in aborted:
                session.abort(request.group)
                self._finish(request)
            if not session.has_work():
                return
            finished = session.step()
            if finished:
                self.last_stats = session.finish()  # kept current for callers that just got their outputs
            for seq in finished:
                request = by_seq.pop(seq.seq_id)
                if all(s.status is SequenceStatus.FINISHED for s in request.group):
                    self._finish(request)

    def _take_pending(self, plan: LayerPlan) -> list[_Request]:
        """Pop the requests at the front of the queue that run with `plan` (call holding `_cond`)."""
        taken = []
        while self._pending and self._pending[0].plan == plan:
            taken.append(self._pending.popleft())
        return taken

    def _drop_aborted_pending(self) -> None:
        """Finish the queued requests that were aborted before they were admitted (call holding `_cond`)."""
        for request in [r for r in self._pending if r.aborted]:
            self._pending.remove(request)
            for seq in request.group:
                seq.finish("abort")
            self._finish(request)

    def _finish(self, request: _Request) -> None:
        """Hand a finished (or aborted) request its output on its event loop."""
        output = request_output(
            request.request_id, request.prompt, request.group, request.plan.skipped, self.engine.detokenize
        )
        self._settle(request, lambda future: future.set_result(output))

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        for request in requests:
            self._settle(request, lambda future: future.set_exception(error))

    def _settle(self, request: _Request, resolve: Callable[[asyncio.Future], None]) -> None:
        """Take the request out of flight and resolve its future on the caller's event loop."""
        with self._cond:
            self._requests.pop(request.request_id, None)
            request.settled = True

        def settle() -> None:
            if not request.future.done():  # the caller may have been cancelled
                resolve(request.future)

        with contextlib.suppress(RuntimeError):  # the caller's event loop has closed: nobody is waiting
            request.loop.call_soon_threadsafe(settle)
