"""Dynamic batching: one worker thread owns the model and decodes the requests waiting for it together.

Requests queue up (a bounded queue: a full one is a 503 with `Retry-After`). When the worker is free it
takes the waiting requests, after a short gathering window when there are fewer than `max_batch` rows,
and runs them as one left-padded batch through the engine's own `inputs` and decode path (vlmkit's
decode loop, or the model's `generate` where the engine uses it), the exact path of `Engine.generate`;
so a greedy reply is token for token the one `vlmkit generate` gives, alone or in a batch
(tests/test_serve.py checks it). What differs per request rides on two hooks called at every step:

- `_Sampler` (a logits processor): a row that samples draws its token from its own temperature, top_p
  and seeded generator and leaves only that token's logit; greedy rows are untouched, so the argmax that
  `generate` takes is the sampled token or the greedy one;
- `_Stepper` (a stopping criterion): it sees each row's new token, decodes the row's text, sends the
  new text to the client, and stops the row at EOS, a stop string, its own `max_tokens`, or when its
  client went away. `generate` ends when every row has stopped.

A request with `n` choices is `n` rows. Requests that arrive while a batch runs wait for the next one
(dynamic, not continuous, batching: a batch's KV cache is laid out for its rows from the prefill on).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from vlmkit.model.decoder import Rows, decode
from vlmkit.serve.errors import ApiError
from vlmkit.serve.requests import Sampling

log = logging.getLogger("vlmkit.serve")


@dataclass(eq=False)
class Job:
    """One request: its prompt, settings, and where its events go (`emit`, called from the worker thread).

    Events: ("delta", choice index, text), ("finish", choice index, finish reason), ("done",),
    ("error", ApiError)."""

    id: str
    messages: list[dict]
    images: list
    sampling: Sampling
    max_tokens: int
    emit: Callable[[tuple], None]
    prompt_tokens: int = 0
    image_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    choices: list["Choice"] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    finished: bool = False

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class Choice:
    """One row of a batch: a request's choice `index`, its tokens so far and the text already sent."""

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index
        self.tokens: list[int] = []
        self.sent = ""  # text already streamed: always a prefix of the final text
        self.text = ""  # the final text
        self.finish_reason: str | None = None
        self.generator = None
        if job.sampling.temperature > 0:
            seed = job.sampling.seed if job.sampling.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator().manual_seed(seed + index)


class Batcher:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, wait_s: float = 0.02):
        self.engine = engine
        self.max_batch, self.max_queue, self.wait_s = max_batch, max_queue, wait_s
        self.tokenizer = engine.processor.tokenizer
        self.eos = engine.stop_ids()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # what /health reports and the tests read
        self.active = 0  # requests admitted and not finished (queued or running)
        self.running = 0  # rows in the batch being decoded
        self.max_batch_run = 0  # the largest batch decoded so far, in rows
        self.batches = 0
        self.cancelled = 0  # requests whose client went away before the end
        self.joined = 0  # rows that joined a batch already being decoded (continuous batching)

    # -- the queue ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="vlmkit-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for job in list(self._waiting):
            self._fail(job, ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down"))
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 503 (with Retry-After) when the queue is full."""
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise ApiError(
                    503, f"the server is busy: {len(self._waiting)} requests are waiting (--max-queue {self.max_queue}); retry shortly",
                    kind="server_error", code="queue_full", headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
            self.active += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, else its rows stop at the next step."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._end(job)

    def _end(self, job: Job) -> None:
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self.active -= 1
            if job.cancelled.is_set():
                self.cancelled += 1

    def _fail(self, job: Job, error: ApiError) -> None:
        _emit(job, ("error", error))
        self._end(job)

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        decoder = self.engine.decoder()
        if decoder is not None and not decoder.window:
            return self._work_continuously()
        while True:
            jobs = self._next_batch()
            if not jobs:
                return
            self._run_batch(jobs)

    def _next_batch(self, room: int | None = None) -> list[Job]:
        """The waiting jobs that fit in `room` rows (default `max_batch`), FIFO. With nothing running
        (`room` None) it waits for a first job, then up to `wait_s` for more; else it takes what waits."""
        with self._cond:
            if room is None:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return []
                deadline = time.monotonic() + self.wait_s
                while sum(j.sampling.n for j in self._waiting) < self.max_batch and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            room = self.max_batch if room is None else room
            batch, rows = [], 0
            while self._waiting and (rows + self._waiting[0].sampling.n <= room or (not batch and room == self.max_batch)):
                job = self._waiting.popleft()
                batch.append(job)
                rows += job.sampling.n
            return batch

    def _work_continuously(self) -> None:
        """Continuous batching over the engine's decode loop: between two decode steps, waiting requests
        are prefilled and join the rows being decoded, and rows that ended (or whose client left) leave."""
        rows: list[Choice] = []
        state = None  # vlmkit.model.decoder.Rows of `rows`
        while True:
            jobs = self._next_batch(self.max_batch - len(rows) if rows else None)
            if not rows and not jobs:
                return  # closed
            for new_rows, group in self._prefill(jobs) if jobs else []:
                if rows:
                    state.join(group, max(r.job.max_tokens for r in new_rows))
                    self.joined += len(new_rows)
                else:
                    state = group
                rows = rows + new_rows
            if not rows:
                continue
            self.running = len(rows)
            self.max_batch_run = max(self.max_batch_run, len(rows))
            try:
                with torch.inference_mode():
                    tokens = _Sampler(rows)(None, state.logits.clone()).argmax(-1)
                    _Stepper(rows, self)(tokens[:, None], None)
                    alive = [i for i, r in enumerate(rows) if r.finish_reason is None]
                    if len(alive) < len(rows):
                        rows = [rows[i] for i in alive]
                        if rows:
                            state.keep(alive)
                            tokens = tokens[alive]
                    if rows:
                        state.step(tokens)
            except Exception as e:
                log.error("decoding %d rows failed: %s", len(rows), traceback.format_exc())
                for job in {id(r.job): r.job for r in rows}.values():
                    if not job.finished:
                        self._fail(job, ApiError(500, f"generation failed ({type(e).__name__}); see the server log", kind="server_error"))
                rows, state = [], None
            self.running = len(rows)

    def _prefill(self, jobs: list[Job]) -> list[tuple[list[Choice], object]]:
        """Run the prompts of `jobs` through the model together: [(their rows, their decode state)]. A batch
        that cannot be prepared is retried job by job, so one bad request fails alone."""
        rows, engine = self._rows(jobs), self.engine
        try:
            inputs = self._inputs(rows)
            with torch.inference_mode():
                group = Rows.prefill(engine.decoder(), engine.model, inputs, max(r.job.max_tokens for r in rows))
        except Exception as e:
            if len(jobs) > 1:
                return [p for job in jobs for p in self._prefill([job])]
            log.error("%s: preparing the request failed: %s", jobs[0].id, traceback.format_exc())
            self._fail(jobs[0], ApiError(500, f"the server could not prepare this request ({type(e).__name__})", kind="server_error"))
            return []
        self.batches += 1
        return [(rows, group)]

    @staticmethod
    def _rows(jobs: list[Job]) -> list[Choice]:
        """One row per choice of each job, in order."""
        for job in jobs:
            job.choices = [Choice(job, i) for i in range(job.sampling.n)]
        return [row for job in jobs for row in job.choices]

    def _inputs(self, rows: list[Choice]) -> dict:
        """The inputs Engine.generate builds, for the whole batch (left-padded)."""
        return self.engine._cast(self.engine.inputs([r.job.messages for r in rows], [r.job.images for r in rows]))

    def _run_batch(self, jobs: list[Job]) -> None:
        rows, engine = self._rows(jobs), self.engine
        try:
            inputs = self._inputs(rows)
        except Exception as e:  # each request was checked alone on arrival; find the one that breaks the batch
            if len(jobs) > 1:
                for job in jobs:
                    self._run_batch([job])
                return
            log.error("%s: preparing the batch failed: %s", jobs[0].id, traceback.format_exc())
            self._fail(jobs[0], ApiError(500, f"the server could not prepare this request ({type(e).__name__})", kind="server_error"))
            return
        self.running = len(rows)
        self.max_batch_run = max(self.max_batch_run, len(rows))
        self.batches += 1
        stepper, sampler = _Stepper(rows, self), _Sampler(rows)
        longest = max(r.job.max_tokens for r in rows)
        try:
            with torch.inference_mode():
                decoder = engine._decoder_for(inputs, longest)
                if decoder is None:
                    engine.model.generate(
                        **inputs,
                        **engine._gen_kwargs(longest, 0.0, 1.0),  # greedy, as Engine
                        logits_processor=LogitsProcessorList([sampler]),
                        stopping_criteria=StoppingCriteriaList([stepper]),
                    )
                else:  # the engine's own decode loop, as Engine.generate runs it
                    decode(
                        decoder, engine.model, inputs, longest, set(), self.tokenizer.pad_token_id,
                        choose=lambda logits: sampler(None, logits.clone()).argmax(-1),
                        on_token=lambda tokens: bool(stepper(tokens[:, None], None).all()),
                    )
            for row in rows:  # generate stops at the longest max_tokens, which the stepper has seen
                if row.finish_reason is None:
                    stepper.finish(row, "length", stepper.decode(row))
        except Exception as e:
            log.error("a batch of %d failed: %s", len(rows), traceback.format_exc())
            for job in jobs:
                if not job.finished:
                    self._fail(job, ApiError(500, f"generation failed ({type(e).__name__}); see the server log", kind="server_error"))
        finally:
            self.running = 0


class _Sampler(LogitsProcessor):
    """Per-row sampling inside a greedy `generate`: a sampling row keeps only the token it drew."""

    def __init__(self, rows: list[Choice]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for b, row in enumerate(self.rows):
            if row.generator is None or row.finish_reason is not None:
                continue
            sampling = row.job.sampling
            probs = torch.softmax(scores[b].float().cpu() / sampling.temperature, dim=-1)  # (V,)
            if sampling.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # the top token always stays
                probs[order[outside]] = 0.0
            token = int(torch.multinomial(probs, 1, generator=row.generator))
            scores[b] = float("-inf")
            scores[b, token] = 0.0
        return scores


class _Stepper(StoppingCriteria):
    """Called by `generate` after each step with every row's tokens: streams text and stops rows."""

    def __init__(self, rows: list[Choice], batcher: Batcher):
        self.rows, self.batcher = rows, batcher
        self.tokenizer, self.eos = batcher.tokenizer, batcher.eos

    def decode(self, row: Choice) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, new):
            if row.finish_reason is None:
                self.step(row, token)
            done.append(row.finish_reason is not None)
        return torch.tensor(done, device=input_ids.device)

    def step(self, row: Choice, token: int) -> None:
        job = row.job
        if job.first_token is None:
            job.first_token = time.monotonic()
        row.tokens.append(token)
        if job.cancelled.is_set():
            return self.finish(row, "cancelled", "")
        text = self.decode(row)
        stops = job.sampling.stop
        at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if at >= 0:
            return self.finish(row, "stop", text[:at])
        if token in self.eos:
            return self.finish(row, "stop", text)
        if len(row.tokens) >= job.max_tokens:
            return self.finish(row, "length", text)
        shown = _shown(text, max((len(s) for s in stops), default=1) - 1)
        if len(shown) > len(row.sent) and shown.startswith(row.sent):
            _emit(job, ("delta", row.index, shown[len(row.sent):]))
            row.sent = shown

    def finish(self, row: Choice, reason: str, text: str) -> None:
        row.finish_reason = reason
        row.text = text.strip()  # as Engine.generate
        job = row.job
        if reason != "cancelled":
            if len(row.text) > len(row.sent) and row.text.startswith(row.sent):
                _emit(job, ("delta", row.index, row.text[len(row.sent):]))
                row.sent = row.text
            _emit(job, ("finish", row.index, reason))
        if all(c.finish_reason is not None for c in job.choices):
            self.batcher._end(job)  # before "done": the client may close as soon as it has it
            if not job.cancelled.is_set():
                _emit(job, ("done",))


def _shown(text: str, hold: int) -> str:
    """The part of a growing reply that is safe to send: stripped as the final text will be, without a
    trailing half UTF-8 character (decoded as U+FFFD) or whitespace, and without the last `hold`
    characters, which could be the start of a stop string."""
    shown = text.lstrip().rstrip("\ufffd").rstrip()
    return shown[: max(len(shown) - hold, 0)]


def _emit(job: Job, event: tuple) -> None:
    try:
        job.emit(event)
    except RuntimeError:  # the client's event loop is gone (shutdown)
        pass
