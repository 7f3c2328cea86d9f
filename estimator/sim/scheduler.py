"""A replica of the installed vLLM's v1 scheduler (0.32.0), advanced by predicted iteration latencies.

What it follows, in `vllm/v1/core/sched/scheduler.py` of vLLM 0.32.0 (`Scheduler.schedule`):
- lines 640-657: `long_prefill_token_threshold` applies only when more than one request is running or waiting;
- lines 659-721: RUNNING requests first, in order; each asks `num_tokens - num_computed_tokens` (capped by the
  threshold, the token budget and `max_model_len - num_computed_tokens - 1`);
- lines 776-846: KV slots for them (`kv_cache_manager.allocate_slots`); when the cache is full, preempt the last
  running request (FCFS) or the lowest-priority one, `max(running, key=(priority, arrival_time))` (priority), by
  recompute: its blocks are freed, `num_computed_tokens` = 0, and it goes back to the front of the waiting queue
  (`_preempt_request`); a preempted request that was already scheduled this step gives its tokens back (priority);
- line 900: WAITING requests only when nothing was preempted in this step;
- lines 912-1170: while the budget lasts and `len(running) < max_num_seqs`: the head of the waiting queue (FCFS
  deque, or the heap ordered by (priority, arrival_time), `request_queue.py`), `num_tokens - num_computed_tokens`
  new tokens (a resumed request recomputes its outputs too), capped by the threshold; without chunked prefill a
  prompt longer than the budget stops the loop; otherwise it is cut to the budget;
- lines 1256-1281 and `kv_cache_manager.py` 522-578: admission needs blocks for the whole sequence
  (`scheduler_reserve_full_isl`, default true) and the chunk's slots in free blocks (watermark 0, the default);
  no free blocks stops the loop.
Prefix caching is off (distinct prompts, as the harness and `profile serve-bench` run), so a request starts with
no computed tokens. Speculative decoding is off.

Two mechanisms of a server around the scheduler, both optional:
- **The front end** (`Frontend`): the API server parses and tokenizes each request, then detokenizes and streams
  each token, on one event loop: a FIFO queue served by one CPU. A request reaches the engine when its parsing is
  done (`request_ms` after the queue frees up); the tokens an iteration samples enter the queue at its end and
  reach the client one after another, `token_ms` each. At light load the queue is empty and these are constants;
  under load they queue, and TTFT and end-to-end grow with the tokens in flight.
- **The join**: a request joins the first iteration scheduled after it reached the engine. The engine core takes
  new requests between two steps (`EngineCore.run_busy_loop`); with async scheduling (`EngineLimits.
  async_scheduling`; the CUDA default, off on the CPU build) step k+1 is scheduled when step k starts, so an arrival
  must be in before the previous step started: it joins one iteration later.

After an iteration, a request whose computed tokens reach its `num_tokens` (prompt + outputs) samples one token
at the iteration's end; it finishes when it has `output_tokens` of them, and its blocks are freed.

The composition of an iteration uses the harness's convention (docs/results-schema.md, iterations): a request
that has not sampled since its (re)start prefills (`prefill_tokens`, Σ chunk², the tokens already cached); one that
has decodes with context `num_tokens` (prompt + tokens returned before).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from contract.request import EngineLimits, Request

Policy = Literal["fcfs", "priority"]


class SimulationError(ValueError):
    """An engine config or workload the replica cannot run (one line)."""


@dataclass(frozen=True)
class EngineConfig(EngineLimits):
    """The scheduler settings of one engine: its limits (contract/request.py `EngineLimits`, as read back from a
    running engine) and its scheduling policy."""

    policy: Policy = "fcfs"
    # NOT vLLM: with the priority policy, a waiting request of higher priority than a running one takes its place
    # when max_num_seqs is reached (the running one is preempted by recompute). vLLM 0.32 does not do this
    # (vLLM issue #40004); the replica offers it only to say what it would change, marked as simulated.
    preemptive_priority: bool = False

    def check(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "max_model_len"):
            if getattr(self, name) < 1:
                raise SimulationError(f"engine config: {name} must be >= 1, got {getattr(self, name)}")
        if self.policy not in ("fcfs", "priority"):
            raise SimulationError(f"engine config: policy must be fcfs or priority, got {self.policy!r}")


@dataclass(frozen=True)
class Step:
    """One simulated iteration: when it ran and what it held (the harness's composition columns)."""

    t_start_s: float
    t_end_s: float
    prefill: tuple[tuple[str, int, int], ...]  # (request id, tokens this step, tokens already cached)
    decode: tuple[tuple[str, int], ...]  # (request id, context = prompt + outputs so far)

    @property
    def request_ids(self) -> list[str]:
        return [r for r, _, _ in self.prefill] + [r for r, _ in self.decode]


@dataclass(frozen=True)
class Frontend:
    """The API server's own work as a FIFO queue on one CPU (ms): parsing and tokenizing a request, and
    detokenizing and streaming one token."""

    request_ms: float = 0.0
    token_ms: float = 0.0


@dataclass
class RequestTrace:
    """What happened to one request in the replica (engine-side times, s; with a front end, `ready_s` when it
    reached the engine and `delivered_s` when each token reached the client)."""

    request: Request
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    preemptions: int = 0
    ready_s: float | None = None
    delivered_s: list[float] = field(default_factory=list)
    queued_s: float | None = None  # when the engine took it into its waiting queue (between iterations)

    @property
    def client_times_s(self) -> list[float]:
        """Each token's time at the client: delivered by the front end, else the engine's."""
        return self.delivered_s or self.token_times_s

    @property
    def finished(self) -> bool:
        return len(self.token_times_s) >= self.request.output_tokens


@dataclass(frozen=True)
class InEngine:
    """A request the engine already holds when the simulation starts (time 0): the request (arrival_s <= 0),
    prompt tokens already computed, outputs already returned, and whether it is running or still waiting."""

    request: Request
    computed_tokens: int = 0
    outputs: int = 0
    running: bool = False


# (prefill_tokens, Σ prefill chunk², decode seqs, Σ decode context, max decode context) -> iteration ms
IterationFn = Callable[[int, float, int, int, int], float]


class _Req:
    """A request's state in the replica: the contract request `a`, and copies of what the hot loop reads of it
    (`prompt`, `target` outputs, `rid`), since a slot read is cheaper than a read through `Request.declared`."""

    __slots__ = ("a", "computed", "outputs", "blocks", "order", "trace", "sampled_since_start", "prompt", "target",
                 "rid")

    def __init__(self, a: Request, order: int, trace: RequestTrace) -> None:
        self.a, self.order, self.trace = a, order, trace
        self.prompt, self.target, self.rid = a.text_tokens, a.output_tokens, a.request_id
        self.computed = 0
        self.outputs = 0
        self.blocks = 0
        self.sampled_since_start = False

    @property
    def num_tokens(self) -> int:
        return self.prompt + self.outputs

    def preempt(self) -> int:
        """Preemption by recompute (`Scheduler._preempt_request`): drop the KV cache and the computed tokens;
        returns the blocks freed."""
        freed, self.blocks, self.computed = self.blocks, 0, 0
        self.sampled_since_start = False
        self.trace.preemptions += 1
        return freed

    def key(self) -> tuple[int, float, int]:
        return (self.a.priority or 0, self.a.arrival_s, self.order)

    def __lt__(self, other: _Req) -> bool:  # the waiting heap's order (Request.__lt__)
        return self.key() < other.key()


class _Waiting:
    """vLLM's waiting queue: a deque (FCFS; preempted requests go to the front) or a heap (priority)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.fifo: deque[_Req] = deque()
        self.heap: list[_Req] = []

    def __len__(self) -> int:
        return len(self.fifo) if self.policy == "fcfs" else len(self.heap)

    def add(self, r: _Req) -> None:
        if self.policy == "fcfs":
            self.fifo.append(r)
        else:
            heapq.heappush(self.heap, r)

    def prepend(self, r: _Req) -> None:
        if self.policy == "fcfs":
            self.fifo.appendleft(r)
        else:
            heapq.heappush(self.heap, r)

    def peek(self) -> _Req:
        return self.fifo[0] if self.policy == "fcfs" else self.heap[0]

    def pop(self) -> _Req:
        return self.fifo.popleft() if self.policy == "fcfs" else heapq.heappop(self.heap)


@dataclass
class SimulationRun:
    """The replica's record: every request's trace, and the steps when asked for."""

    requests: list[RequestTrace]
    steps: list[Step]
    iterations: int
    end_s: float


def simulate(
    arrivals: Sequence[Request],
    config: EngineConfig,
    iteration_ms: IterationFn,
    iteration_overhead_ms: float = 0.0,
    sequence_overhead_ms: float = 0.0,
    measured_windows: Sequence[tuple[float, float]] | None = None,
    keep_steps: bool = False,
    max_iterations: int = 50_000_000,
    in_engine: Sequence[InEngine] = (),
    frontend: Frontend | None = None,
    level_at: Callable[[float], float] | None = None,
) -> SimulationRun:
    """Run the arrivals through the scheduler replica; the clock advances by each iteration's predicted latency
    (`iteration_ms` of its composition) plus `iteration_overhead_ms` plus `sequence_overhead_ms` per request in
    the iteration, and jumps over an idle engine to the next arrival.

    `measured_windows` replays a measured run's clock instead: iteration k starts no earlier than its measured
    start (arrivals up to then join it) and ends at its measured end (s, on the arrivals' clock); past the
    last window the model takes over. This checks the replica's decisions apart from the model's times.

    `in_engine` starts the replica from an engine's state (what a scheduler sees at an arrival): those requests
    hold their KV blocks and run or wait in the given order; only `arrivals` get traces.

    `frontend` puts the API server's queue between the arrivals and the engine, and between the engine's tokens
    and the client (module docstring); with `config.async_scheduling` an arrival joins one iteration later."""
    config.check()
    bs = config.block_size
    at = [a.arrival_s for a in arrivals]  # read once: the loop checks the next arrival every iteration
    ordered = sorted(range(len(arrivals)), key=lambda i: (at[i], i))
    traces = [RequestTrace(a) for a in arrivals]
    for a in arrivals:
        if a.text_tokens < 1 or a.output_tokens < 1:
            raise SimulationError(f"request {a.request_id}: prompt and output lengths must be >= 1")
        if a.text_tokens + a.output_tokens > config.max_model_len:
            raise SimulationError(
                f"request {a.request_id}: {a.text_tokens} + {a.output_tokens} tokens exceed max_model_len "
                f"{config.max_model_len}"
            )
        if -(-(a.text_tokens + a.output_tokens) // bs) > config.num_blocks:
            raise SimulationError(
                f"request {a.request_id}: needs more KV blocks than the engine has ({config.num_blocks} of {bs})"
            )
    waiting = _Waiting(config.policy)
    running: list[_Req] = []
    free = config.num_blocks
    for k, h in enumerate(in_engine):
        r = _Req(h.request, -len(in_engine) + k, RequestTrace(h.request))
        r.computed = min(h.computed_tokens, h.request.text_tokens + h.outputs)
        r.outputs = h.outputs
        r.sampled_since_start = h.outputs > 0
        if h.running:
            r.blocks = -(-r.computed // bs)
            free -= r.blocks
            running.append(r)
        else:
            r.computed, r.sampled_since_start = 0, False  # a preempted one recomputes prompt + outputs
            waiting.add(r)
    t = 0.0
    nxt = 0
    steps: list[Step] = []
    n_iter = 0
    fcfs = config.policy == "fcfs"
    fe = frontend if frontend is not None and (frontend.request_ms > 0 or frontend.token_ms > 0) else None
    ready = at if fe is None else [math.inf] * len(arrivals)  # when each request reaches the engine
    fe_free = 0.0  # when the front end's queue is next idle (s)
    fe_done = 0  # arrivals (in `ordered`) the front end has parsed
    fe_req_s = fe.request_ms / 1e3 if fe is not None else 0.0
    fe_tok_s = fe.token_ms / 1e3 if fe is not None else 0.0
    t_sched = 0.0  # when the coming iteration's schedule is decided (its start; the previous start, async)
    prev_start = 0.0
    while nxt < len(ordered) or len(waiting) or running:
        if fe is not None:
            while fe_done < len(ordered) and at[ordered[fe_done]] <= t:
                i = ordered[fe_done]
                fe_free = max(fe_free, at[i]) + fe_req_s
                ready[i] = traces[i].ready_s = fe_free
                fe_done += 1
        t_sched = prev_start if config.async_scheduling and (running or len(waiting)) else t
        while nxt < len(ordered) and ready[ordered[nxt]] <= t_sched:
            i = ordered[nxt]
            waiting.add(_Req(arrivals[i], i, traces[i]))
            traces[i].queued_s = t
            nxt += 1
        if measured_windows is not None and n_iter < len(measured_windows) and measured_windows[n_iter][0] > t:
            t = measured_windows[n_iter][0]
            continue  # admit what arrived by the measured start
        if not len(waiting) and not running:
            t = max(t, _next_event(ordered, nxt, fe_done, at, ready))
            continue
        # ---- schedule (Scheduler.schedule) ----
        budget = config.max_num_batched_tokens
        eligible = len(running) + len(waiting)
        threshold = config.long_prefill_token_threshold if eligible > 1 else 0
        scheduled: dict[int, int] = {}  # id(_Req) -> tokens
        order: list[_Req] = []
        preempted = False
        if config.preemptive_priority and config.policy == "priority":  # simulated only: not vLLM (see EngineConfig)
            while len(waiting) and len(running) >= config.max_num_seqs:
                victim = max(running, key=_Req.key)
                if not waiting.peek().key() < victim.key():
                    break
                running.remove(victim)
                free += victim.preempt()
                waiting.add(victim)
        idx = 0
        while idx < len(running) and budget > 0:
            r = running[idx]
            n = r.num_tokens - r.computed
            if 0 < threshold < n:
                n = threshold
            n = min(n, budget, config.max_model_len - r.computed - 1)
            if n <= 0:
                idx += 1
                continue
            self_preempted = False
            while True:
                need = -(-(r.computed + n) // bs) - r.blocks
                if need <= free:
                    break
                victim = running[-1] if fcfs else max(running, key=_Req.key)
                vi = running.index(victim)
                del running[vi]
                if vi < idx:
                    idx -= 1
                if id(victim) in scheduled:
                    budget += scheduled.pop(id(victim))
                    order.remove(victim)
                free += victim.preempt()
                waiting.prepend(victim)
                preempted = True
                if victim is r:
                    self_preempted = True
                    break
            if self_preempted:  # no room even alone: nothing more from the running queue this step
                break
            need = -(-(r.computed + n) // bs) - r.blocks
            r.blocks += need
            free -= need
            scheduled[id(r)] = n
            order.append(r)
            budget -= n
            idx += 1
        if not preempted:
            while budget > 0 and len(waiting) and len(running) < config.max_num_seqs:
                r = waiting.peek()
                n = r.num_tokens - r.computed
                if 0 < threshold < n:
                    n = threshold
                if not config.enable_chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                full = -(-min(r.num_tokens, config.max_model_len) // bs)
                need = -(-(r.computed + n) // bs) - r.blocks
                if full - r.blocks > free or need > free:
                    break
                waiting.pop()
                r.blocks += need
                free -= need
                running.append(r)
                scheduled[id(r)] = n
                order.append(r)
                budget -= n
                if r.trace.first_scheduled_s is None:
                    r.trace.first_scheduled_s = t
        if not order:
            if nxt < len(ordered):
                t = max(t, _next_event(ordered, nxt, fe_done, at, ready))
                prev_start = t  # no step ran: the next schedule is decided afresh
                continue
            raise SimulationError("the replica cannot schedule any waiting request (KV cache too small)")
        # ---- the iteration ----
        prefill: list[tuple[str, int, int]] = []
        decode: list[tuple[str, int]] = []
        pre_tokens = 0
        pre_sq = 0.0
        ctx_sum = 0
        ctx_max = 0
        for r in order:
            n = scheduled[id(r)]
            if r.sampled_since_start:
                ctx = r.num_tokens
                decode.append((r.rid, ctx))
                ctx_sum += ctx
                ctx_max = max(ctx_max, ctx)
            else:
                prefill.append((r.rid, n, r.computed))
                pre_tokens += n
                pre_sq += float(n) * n
        if measured_windows is not None and n_iter < len(measured_windows):
            t_end = max(t, measured_windows[n_iter][1])
        else:
            ms = iteration_ms(pre_tokens, pre_sq, len(decode), ctx_sum, ctx_max)
            if level_at is not None:  # a level that moves over the run (s -> ratio), as a live follower sees it
                ms *= level_at(t)
            t_end = t + (max(ms, 0.0) + iteration_overhead_ms + sequence_overhead_ms * len(order)) / 1000.0
        if keep_steps:
            steps.append(Step(t, t_end, tuple(prefill), tuple(decode)))
        n_iter += 1
        if n_iter > max_iterations:
            raise SimulationError(f"the replica ran past {max_iterations} iterations")
        # ---- update_from_output ----
        done: list[_Req] = []
        if fe is not None:  # requests that arrived during the iteration are parsed before its tokens are streamed
            while fe_done < len(ordered) and at[ordered[fe_done]] < t_end:
                i = ordered[fe_done]
                fe_free = max(fe_free, at[i]) + fe_req_s
                ready[i] = traces[i].ready_s = fe_free
                fe_done += 1
            fe_free = max(fe_free, t_end)
        for r in order:
            r.computed += scheduled[id(r)]
            if r.computed >= r.num_tokens:
                r.outputs += 1
                r.sampled_since_start = True
                r.trace.token_times_s.append(t_end)
                if fe is not None:
                    fe_free += fe_tok_s
                    r.trace.delivered_s.append(fe_free)
                if r.outputs >= r.target:
                    done.append(r)
        if done:
            gone = {id(r) for r in done}
            running = [r for r in running if id(r) not in gone]
            for r in done:
                free += r.blocks
                r.blocks = 0
        prev_start = t
        t = t_end
        if in_engine and not arrivals_left(traces):
            break  # the arrivals are all served: what the held requests do after that is not asked
    return SimulationRun(traces, steps, n_iter, t)


def _next_event(ordered: Sequence[int], nxt: int, fe_done: int, at: Sequence[float],
                ready: Sequence[float]) -> float:
    """When the next waiting arrival can be taken: its time at the engine if the front end has parsed it, else its
    arrival (the front end parses it then)."""
    i = ordered[nxt]
    return ready[i] if nxt < fe_done or ready is at else at[i]


def arrivals_left(traces: Sequence[RequestTrace]) -> bool:
    return any(not tr.finished for tr in traces)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation, as numpy's default); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
