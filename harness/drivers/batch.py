"""Several requests in flight: drive one engine iteration by iteration and record each iteration's composition.

`profile replay` (timed arrivals, harness/drivers/replay.py) and the sweep's batch points (the `batch` axis,
harness/drivers/batch_points.py) both run through `Drive`. One `step()` call returns one engine-core iteration's outputs
(vLLM 0.32 `LLMEngine.step`: one `EngineCoreOutputs` per call, with that iteration's `SchedulerIterationDetails`);
a call that returns no token and no iteration details did no work and is folded into the next one, as for samples.

Composition as the harness knows it: a request whose first token came back was prefilled in that iteration (the
rest of its prompt); one that already had tokens decoded one. A chunk of a prompt that returns no token (chunked
prefill, when several prompts exceed the token budget together) is visible only in the engine's own count: the
difference is attributed to the waiting requests in the order they were added (vLLM schedules first come, first
served), and the row says so (`prefill_chunk_inferred`). Where the engine's counts still disagree with the
harness's, `composition_mismatch` is set; nothing is hidden.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from contract.policy import ArrivalPolicy, Held, PolicyError
from contract.request import Request
from harness.engine.vllm_engine import EngineError, MeasurementError, VllmEngine, client_lag_marks
from harness.telemetry.sources import join_snapshots

IDLE_POLL_S = 0.05  # longest sleep while waiting for the next arrival (a stop request is seen this fast)


@dataclass
class InFlight:
    """One request to drive: the contract request (what its client declared, and the true output length the engine
    is asked for: `ignore_eos` with `max_tokens = request.output_tokens`), its prompt's token ids, and when to add
    it: `start_s` seconds after the drive starts; or None and `after_tokens`: added once the first request added
    has returned that many tokens (a prompt joining mid-decode). `workload_clock`: record the request's own
    `arrival_s` (a replay's) as its arrival, rather than when the drive added it."""

    request: Request
    token_ids: list[int]
    prompt_id: str
    start_s: float | None = 0.0
    after_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    workload_clock: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class _State:
    req: InFlight
    order: int
    arrival_t: float  # perf_counter clock
    added_t: float
    prefilled: int = 0  # prompt tokens already in the KV cache (chunks seen)
    token_t: list[float] = field(default_factory=list)
    first_iteration: int | None = None
    last_iteration: int | None = None
    finished: bool = False
    priority: int = 0
    decision_us: float | None = None  # the arrival policy's decision time (µs), where one decided
    rejected: str | None = None  # why the policy rejected it (then it never reached the engine)

    @property
    def tokens(self) -> int:
        return len(self.token_t)

    def held(self, now: float) -> Held:
        return Held(self.req.request.declared, self.priority, now - self.arrival_t, self.prefilled, self.tokens,
                    self.first_iteration is not None)


@dataclass
class Iteration:
    """One engine iteration: caller's timing, the engine's own time and counts, and the harness's composition."""

    iteration: int
    t_start_s: float
    t_end_s: float
    latency_ms: float
    step_calls: int
    engine_elapsed_ms: float | None
    engine_counts: tuple[int, int, int, int] | None  # ctx requests, ctx tokens, generation requests, gen tokens
    prefill: list[tuple[str, int, int]]  # (request id, prompt tokens processed, tokens already in the KV cache)
    decode: list[tuple[str, int]]  # (request id, KV length: text_tokens + tokens returned before, as `position`)
    prefill_chunk_inferred: bool = False
    # the harness's own share of the time between iterations: from the previous iteration's end to this one's
    # first step call, while the engine held requests (None after an idle engine); and whether the harness wrote
    # its files in that gap (a checkpoint: a replay's, not a server's)
    gap_before_ms: float | None = None
    checkpoint_before: bool = False

    def row(self) -> dict[str, Any]:
        ctx = [c for _, c in self.decode]
        counts = self.engine_counts
        pre_tokens = sum(n for _, n, _ in self.prefill)
        mine = (len(self.prefill), pre_tokens, len(self.decode), len(self.decode))
        return {
            "iteration": self.iteration,
            "t_start_s": self.t_start_s,
            "t_end_s": self.t_end_s,
            "latency_ms": self.latency_ms,
            "step_calls": self.step_calls,
            "engine_elapsed_ms": self.engine_elapsed_ms,
            "num_prefill_seqs": len(self.prefill),
            "prefill_tokens": pre_tokens,
            "prefill_ctx_sum": sum(c for _, _, c in self.prefill),
            "num_decode_seqs": len(self.decode),
            "decode_ctx_sum": sum(ctx),
            "decode_ctx_max": max(ctx, default=0),
            "decode_ctx_min": min(ctx, default=0),
            "batch_size": len(self.prefill) + len(self.decode),
            "request_ids": ",".join([r for r, _, _ in self.prefill] + [r for r, _ in self.decode]),
            "engine_num_ctx_seqs": counts[0] if counts else None,
            "engine_num_ctx_tokens": counts[1] if counts else None,
            "engine_num_gen_seqs": counts[2] if counts else None,
            "engine_num_gen_tokens": counts[3] if counts else None,
            "composition_mismatch": counts is not None and counts != mine,
            "prefill_chunk_inferred": self.prefill_chunk_inferred,
            "gap_before_ms": self.gap_before_ms,
            "checkpoint_before": self.checkpoint_before,
        }


class Drive:
    """Drives requests through a started engine until all have finished (or `stop()` says so).

    `checkpoint(drive)` is called while the engine is idle before a later arrival, and after an iteration that
    brings the finished-but-not-checkpointed requests to `flush_every` (0: only when idle); the replay writes
    its files there. Iteration indices start at `iteration_offset`.

    `policy` (contract/policy.py) decides each request's priority at its arrival, from what the engine holds then,
    or rejects it: a rejected request is recorded as such (`rejected`) and never sent to the engine. The decision
    is timed per request. `solo`: each request is sent only when the engine is idle (its latency alone; arrival =
    when it was sent).
    """

    def __init__(
        self,
        engine: VllmEngine,
        requests: list[InFlight],
        stop: Callable[[], bool] = lambda: False,
        checkpoint: Callable[[Drive], None] | None = None,
        flush_every: int = 0,
        iteration_offset: int = 0,
        policy: ArrivalPolicy | None = None,
        solo: bool = False,
    ) -> None:
        self.engine, self.requests, self.stop = engine, requests, stop
        self.policy, self.solo = policy, solo
        self.checkpoint, self.flush_every, self.offset = checkpoint, flush_every, iteration_offset
        self.states: dict[str, _State] = {}
        self.iterations: list[Iteration] = []
        self.t0 = 0.0
        self.unflushed = 0  # requests finished since the last checkpoint
        self.stopped = False

    def finished(self) -> list[_State]:
        return [s for s in self.states.values() if s.finished]

    def run(self) -> Drive:
        """Add each request when due and step the engine until every request has finished. Raises EngineError
        when the engine fails and MeasurementError when a request comes back other than asked (length, cache)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.engine.llm_engine
        details = self.engine.collect_iteration_details()
        settings = self.engine.settings
        timed = sorted((r for r in self.requests if r.start_s is not None), key=lambda r: r.start_s or 0.0)
        triggered = [r for r in self.requests if r.start_s is None]
        pc = time.perf_counter

        def add(req: InFlight, arrival_t: float) -> None:
            priority, decision_us, rejected = req.request.priority or 0, None, None
            if self.policy is not None:
                now = pc()
                held = [s.held(now) for s in self.states.values() if not s.finished]
                try:
                    decision = self.policy.decide(req.request.declared, held)
                except Exception as e:
                    raise PolicyError(f"policy {self.policy.name} on {req.request_id}: {e}") from e
                decision_us = (pc() - now) * 1e6
                priority = decision.priority
                if not decision.admit:
                    rejected = decision.reason or "rejected by the policy"
            if rejected is None:
                params = SamplingParams(**settings.sampling_params(req.request.output_tokens, req.sampling))
                extra = {"priority": priority} if priority else {}  # FCFS: vLLM's own call, unchanged
                llm.add_request(req.request_id, TokensPrompt(prompt_token_ids=req.token_ids), params, **extra)
            st = _State(req, len(self.states), arrival_t, pc(), priority=priority, decision_us=decision_us,
                        rejected=rejected, finished=rejected is not None)
            self.states[req.request_id] = st
            if rejected is not None:
                self.unflushed += 1

        if settings.gc_guard:  # as in run_request: no collection inside a timed step
            gc.collect()
            gc.freeze()
            gc.disable()
        window_start, busy, calls = -1.0, 0.0, 0
        last_end: float | None = None  # the previous iteration's end; None until one ran or after an idle engine
        wrote = False  # a checkpoint since the previous iteration
        self.t0 = pc()
        i_timed = 0
        try:
            while True:
                now = pc()
                if self.solo and i_timed < len(timed) and not llm.has_unfinished_requests():
                    add(timed[i_timed], now)
                    i_timed += 1
                while not self.solo and i_timed < len(timed) and self.t0 + (timed[i_timed].start_s or 0.0) <= now:
                    add(timed[i_timed], self.t0 + (timed[i_timed].start_s or 0.0))
                    i_timed += 1
                if triggered:
                    first = next(iter(self.states.values()), None)
                    running = llm.has_unfinished_requests()
                    if first is not None and (first.tokens >= (triggered[0].after_tokens or 0) or not running):
                        for req in triggered:
                            add(req, pc())
                        triggered = []
                if not llm.has_unfinished_requests():
                    last_end = None  # idle: the next gap is not the harness's alone
                    if i_timed >= len(timed) and not triggered:
                        break
                    if self.stop():
                        break
                    if self.checkpoint is not None and self.unflushed:
                        self.checkpoint(self)
                        self.unflushed = 0
                    if i_timed < len(timed) and not self.solo:
                        self._wait_until(self.t0 + (timed[i_timed].start_s or 0.0))
                    continue
                if self.stop():
                    break
                n_details = len(details)
                ta = pc()
                outs = llm.step()
                tb = pc()
                if window_start < 0:
                    window_start = ta
                busy += tb - ta
                calls += 1
                emitted = []
                for out in outs:
                    st = self.states.get(out.request_id)
                    if st is not None and (len(out.outputs[0].token_ids) > st.tokens or out.finished):
                        emitted.append((st, out))
                new_details = details[n_details:]
                if not emitted and not new_details:
                    continue  # no work in this call: its time goes with the next iteration's
                gap = (window_start - last_end) * 1e3 if last_end is not None else None
                self._iteration(window_start, ta, tb, busy, calls, emitted, new_details, gap, wrote)
                window_start, busy, calls = -1.0, 0.0, 0
                last_end, wrote = tb, False
                if self.checkpoint is not None and self.flush_every and self.unflushed >= self.flush_every:
                    self.checkpoint(self)
                    self.unflushed = 0
                    wrote = True
        except (MeasurementError, PolicyError):
            raise
        except Exception as e:
            why = self.engine.died or f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            raise EngineError(f"engine failed during a batch: {why}") from e
        finally:
            if settings.gc_guard:
                gc.enable()
            unfinished = [rid for rid, s in self.states.items() if not s.finished and s.rejected is None]
            if unfinished:  # stopped or failed early: the engine must not keep them for the next drive
                with contextlib.suppress(Exception):  # an engine that is going away cannot abort; it is closed next
                    llm.abort_request(unfinished)
        self.stopped = bool(unfinished) or i_timed < len(timed) or bool(triggered)
        return self

    def _wait_until(self, target: float) -> None:
        """Sleep until `target` (perf_counter clock), in short naps so a stop request is seen; spin the last ms."""
        while not self.stop():
            left = target - time.perf_counter()
            if left <= 0:
                return
            if left > 0.002:
                time.sleep(min(left - 0.001, IDLE_POLL_S))

    def _iteration(
        self,
        start: float,
        last_call: float,
        end: float,
        busy: float,
        calls: int,
        emitted: list[Any],
        details: list[Any],
        gap_ms: float | None = None,
        wrote: bool = False,
    ) -> None:
        idx = self.offset + len(self.iterations)
        prefill: list[tuple[str, int, int]] = []
        decode: list[tuple[str, int]] = []
        emitted_ids = set()
        for st, out in emitted:
            rid, n_prompt = st.req.request_id, len(st.req.token_ids)
            emitted_ids.add(rid)
            n = len(out.outputs[0].token_ids)
            if n > st.tokens:
                if st.tokens == 0:
                    prefill.append((rid, n_prompt - st.prefilled, st.prefilled))
                    st.prefilled = n_prompt
                else:
                    decode.append((rid, n_prompt + st.tokens))
                st.token_t.extend([end] * (n - st.tokens))
                if st.first_iteration is None:
                    st.first_iteration = idx
                st.last_iteration = idx
            if out.finished:
                self._check(st, out)
                st.finished = True
                self.unflushed += 1
        counts: tuple[int, int, int, int] | None = None
        elapsed = None
        if details:
            elapsed = float(sum(d.elapsed_ms for d in details))
            counts = (
                sum(int(d.num_ctx_requests) for d in details),
                sum(int(d.num_ctx_tokens) for d in details),
                sum(int(d.num_generation_requests) for d in details),
                sum(int(d.num_generation_tokens) for d in details),
            )
        inferred = False
        hidden = counts[1] - sum(n for _, n, _ in prefill) if counts else 0
        if hidden > 0:  # prompt chunks that returned no token: the waiting requests, first added first
            waiting = [
                s for s in self.states.values()
                if not s.finished and s.tokens == 0 and s.req.request_id not in emitted_ids and s.added_t < last_call
            ]
            for st in sorted(waiting, key=lambda s: s.order):
                # a chunk that ends the prompt returns a token: an unseen chunk leaves at least one
                take = min(hidden, len(st.req.token_ids) - st.prefilled - 1)
                if take <= 0:
                    continue
                prefill.append((st.req.request_id, take, st.prefilled))
                st.prefilled += take
                hidden -= take
                inferred = True
                if st.first_iteration is None:
                    st.first_iteration = idx
                if hidden == 0:
                    break
        self.iterations.append(
            Iteration(idx, start, end, busy * 1e3, calls, elapsed, counts, prefill, decode, inferred, gap_ms, wrote)
        )

    @staticmethod
    def _check(st: _State, out: Any) -> None:
        rid, sent, asked = st.req.request_id, len(st.req.token_ids), st.req.request.output_tokens
        received = len(out.prompt_token_ids or [])
        cached = int(out.num_cached_tokens or 0)
        generated = len(out.outputs[0].token_ids)
        if received != sent:
            raise MeasurementError(f"{rid}: engine received {received} prompt tokens, {sent} sent")
        if cached:
            raise MeasurementError(f"{rid}: {cached} prompt tokens came from the prefix cache; expected 0")
        if generated != asked:
            raise MeasurementError(f"{rid}: engine generated {generated} tokens, {asked} asked")

    # --- tables -----------------------------------------------------------------------------------------

    def iteration_rows(self, common: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per iteration so far, `common` (run, segment, axes, ...) first."""
        return [{**common, **it.row()} for it in self.iterations]

    def request_rows(self, common: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per finished request, in the order they were added. A rejected request has `rejected` (why)
        and no times (NaN)."""
        start = {it.iteration: it.t_start_s for it in self.iterations}
        rows = []
        nan = float("nan")
        for st in sorted(self.finished(), key=lambda s: s.order):
            req, a = st.req, st.arrival_t
            first = st.first_iteration if st.first_iteration is not None else -1
            times = [(t - a) * 1e3 for t in st.token_t]  # none for a rejected request
            rows.append(
                {
                    **common,
                    "request_id": req.request_id,
                    "arrival_s": req.request.arrival_s if req.workload_clock else a - self.t0,
                    "arrival_t_s": a,
                    "add_lag_ms": (st.added_t - a) * 1e3 if st.rejected is None else nan,
                    "text_tokens": len(req.token_ids),
                    "new_tokens": req.request.output_tokens,
                    "max_tokens": req.request.max_tokens,
                    "client_class": req.request.client_class or "",
                    "prompt_id": req.prompt_id,
                    "first_iteration": first,
                    "last_iteration": st.last_iteration if st.last_iteration is not None else -1,
                    "queue_ms": (start[first] - a) * 1e3 if first in start else None,
                    "ttft_ms": times[0] if times else nan,
                    "e2e_ms": times[-1] if times else nan,
                    "token_times_ms": times,
                    "priority": st.priority,
                    "decision_us": st.decision_us if st.decision_us is not None else nan,
                    "rejected": st.rejected is not None,
                    "rejected_reason": st.rejected or "",
                }
            )
        return rows


def iterations_frame(rows: list[dict[str, Any]], telemetry: pd.DataFrame) -> pd.DataFrame:
    """Iteration rows as a table: `client_lagged` (as in samples) and the telemetry snapshot nearest each
    iteration's midpoint (`tel_*`, `throttled`; join_snapshots' logic, without its per-request energy)."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    eng = frame["engine_elapsed_ms"].astype("float64")
    mode = str(frame["engine_mode"].iloc[0]) if "engine_mode" in frame else "multiprocess"
    frame["client_lagged"] = client_lag_marks(
        frame["latency_ms"].astype("float64").tolist(), [None if pd.isna(e) else e for e in eng], mode
    )
    for c in ("engine_num_ctx_seqs", "engine_num_ctx_tokens", "engine_num_gen_seqs", "engine_num_gen_tokens"):
        frame[c] = frame[c].astype("Int64")
    frame["engine_elapsed_ms"] = frame["engine_elapsed_ms"].astype("float64")
    if "gap_before_ms" in frame:
        frame["gap_before_ms"] = frame["gap_before_ms"].astype("float64")
    probe = frame[["t_start_s", "t_end_s"]].assign(point_id="", rep=np.arange(len(frame)))
    joined = join_snapshots(probe, telemetry)
    tel = [c for c in joined.columns if c.startswith("tel_") or c == "throttled"]
    return pd.concat([frame, joined[tel]], axis=1)


def requests_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if not frame.empty:
        for c in ("queue_ms", "decision_us", "add_lag_ms", "ttft_ms", "e2e_ms"):
            if c in frame:
                frame[c] = frame[c].astype("float64")
    return frame
