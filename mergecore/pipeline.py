"""The streaming merge executor: read -> (H2D) -> compute -> (D2H) -> write, overlapped.

Three stages run at once, connected by queues and bounded by one ``ByteBudget``:

- a reader thread walks the plan in order and reads each output tensor's inputs (each
  distinct input tensor once) into host buffers with positional reads; on CUDA it also
  starts the host-to-device copies on a copy stream;
- the calling thread computes: it groups consecutive small tensors into one batched
  kernel call (``mergecore.merge_many``), so norms and biases cost one call per group;
- a writer thread puts each output's bytes at its final offset in its shard.

Every byte in flight (inputs read and not yet merged, outputs not yet written) is counted
against the budget, so peak memory is set by ``max_memory``, not by the model's size.
Host buffers (inputs, CPU outputs, the D2H staging of CUDA outputs) come from one
``BufferPool`` and go back to it once consumed, so the same pages serve tensor after tensor
instead of being faulted in (and, on CUDA, pinned) afresh.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mergecore.budget import ByteBudget, auto_budget, available_memory
from mergecore.buffer_pool import BufferPool
from mergecore.dtypes import FLOAT8_DTYPES, parse_dtype
from mergecore.errors import NonFiniteError
from mergecore.interrupt import interrupts_deferred
from mergecore.io.types import SAFETENSORS_DTYPES, TensorInfo
from mergecore.lora.inputs import PlanAdapters, apply_updates, updates_to
from mergecore.ops import make_job, merge_many
from mergecore.plan import distinct_input_bytes
from mergecore.transfer_timer import TransferTimer
from mergecore.vocab_tail import join_tail, split_tail

if TYPE_CHECKING:
    from mergecore.plan import PlannedTensor
    from mergecore.recipes.graph import FusedTensor

    #: One output tensor of a run: planned (one merge) or fused (a recipe's stages).
    WorkItem = PlannedTensor | FusedTensor

_DONE = object()


@dataclass
class PipelineOptions:
    """Knobs of one run."""

    device: str = "cpu"
    max_memory: int | None = None  # None: budget.auto_budget
    random_seed: int | None = None
    batch_elements: int = 1 << 22  # group consecutive tensors up to this many elements
    batch_tensors: int = 64
    drop_page_cache: bool = True
    progress: Callable[[int], None] | None = None  # called with input bytes consumed


@dataclass
class PipelineStats:
    """What one run did and how long each stage was busy (seconds, wall clock).

    ``wall`` runs from the first read to the finalized output: it includes ``finish``, the
    time after the last tensor was handed to the writer (the last shard's hash, fsync and
    rename, the side files, the index), which ``write_busy`` does not."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    wall: float = 0.0
    read_busy: float = 0.0
    compute_busy: float = 0.0
    write_busy: float = 0.0
    finish: float = 0.0
    peak_budget_bytes: int = 0
    budget_bytes: int = 0  # the budget the run had (--max-memory, or the automatic one)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra

    def add_finish(self, seconds: float) -> None:
        """Count the time spent finalizing the output (``finish``) in the wall time."""
        self.finish += seconds
        self.wall += seconds


@dataclass
class _Item:
    planned: Any  # PlannedTensor
    inputs: list[torch.Tensor]
    in_bytes: int
    out_bytes: int
    ready: Any = None  # CUDA event when inputs were copied on a side stream
    lora: Any = None  # per input, its LoRA update (None: unchanged), or None for none
    extra_bytes: int = 0  # budget held for the LoRA updates
    pooled: list[torch.Tensor] = field(default_factory=list)  # buffers taken from the pool


def _item_bytes(planned: WorkItem) -> tuple[int, int]:
    if hasattr(planned, "byte_counts"):  # a fused multi-stage item (mergecore.recipes)
        return planned.byte_counts()
    in_bytes = distinct_input_bytes(planned.inputs)
    out_bytes = SAFETENSORS_DTYPES[planned.out_dtype][1]
    for s in planned.shape:
        out_bytes *= s
    return in_bytes, out_bytes


def held_bytes(planned: WorkItem, adapters: PlanAdapters | None) -> tuple[int, int, int]:
    """What one planned tensor holds of the budget while in flight: its distinct inputs, its
    output and its adapters' factors and working copies (bytes)."""
    in_bytes, out_bytes = _item_bytes(planned)
    extra = adapters.extra_bytes(planned) if adapters else 0
    return in_bytes, out_bytes, extra


def largest_held(tensors: Sequence[WorkItem], adapters: PlanAdapters | None) -> int:
    """The most any one of ``tensors`` holds of the budget (``held_bytes``, summed)."""
    return max((sum(held_bytes(t, adapters)) for t in tensors), default=0)


def run_budget(tensors: Sequence[WorkItem], adapters: PlanAdapters | None,
               max_memory: int | None) -> int:
    """The budget of a run over ``tensors``: ``max_memory``, or when None the automatic one
    (``budget.auto_budget`` of ``largest_held``)."""
    if max_memory is not None:
        return max_memory
    return auto_budget(largest_held(tensors, adapters), available_memory())


#: How long a stopped run waits for its stage threads to end before it gives up on them.
STOP_WAIT_SECONDS = 60.0


class _Stage(threading.Thread):
    """A worker thread that records the first exception it hits, and says when its work is
    over (``finished``: ``is_alive`` cannot be trusted after an interrupted ``join``, which
    Python 3.11 marks as stopped while the thread still runs)."""

    def __init__(self, name: str, target: Callable[[], None], on_error: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._on_error = on_error
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc
            self._on_error()
        finally:
            self.finished.set()


def _as_tensor(buf: torch.Tensor, info: TensorInfo, rows: int | None) -> torch.Tensor:
    t = buf[: info.nbytes].view(SAFETENSORS_DTYPES[info.dtype][0]).reshape(info.shape)
    if rows is not None and info.shape and rows < info.shape[0]:
        t = t[:rows]
    return t


class MergePipeline:
    """Runs a ``MergePlan`` into a streaming writer."""

    def __init__(self, plan, reader, writer, options: PipelineOptions):
        self.plan = plan
        self.reader = reader
        self.writer = writer
        self.options = options
        self.device = torch.device(options.device)
        self._adapters = PlanAdapters.for_plan(plan.tensors)
        self.max_memory = run_budget(plan.tensors, self._adapters, options.max_memory)
        self.budget = ByteBudget(self.max_memory)
        # the pool keeps its buffers (free or in use) within the budget's size; it exceeds that
        # only while the budget itself lets one oversized tensor through
        self.pool = BufferPool(self.max_memory, pin_memory=self.device.type == "cuda")
        self.stats = PipelineStats()
        self._to_compute: queue.Queue = queue.Queue()
        self._to_write: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._h2d = TransferTimer() if self._cuda else None
        self._d2h = TransferTimer() if self._cuda else None

    # ----- stage 1: read ------------------------------------------------------------------
    def _read_all(self) -> None:
        for planned in self.plan.tensors:
            if self._stop.is_set():
                break
            in_bytes, out_bytes, extra = held_bytes(planned, self._adapters)
            self.budget.acquire(in_bytes + out_bytes + extra)
            start = time.perf_counter()
            buffers: dict[tuple, torch.Tensor] = {}
            inputs, keys = [], []
            for inp in planned.inputs:
                key = (str(inp.info.file), inp.info.data_start)
                if key not in buffers:
                    buf = self.pool.take(inp.info.nbytes,
                                         phase=self.reader.direct_phase(inp.info))
                    buffers[key] = buf
                    self.reader.read_into(inp.info, buf)
                    self.stats.bytes_read += inp.info.nbytes
                inputs.append(_as_tensor(buffers[key], inp.info, inp.rows))
                keys.append(key)
            item = _Item(planned, inputs, in_bytes, out_bytes, extra_bytes=extra,
                         pooled=list(buffers.values()))
            if self._adapters is not None:
                item.lora = self._adapters.updates(planned)
                self.stats.bytes_read += sum(u.nbytes for u in item.lora or () if u)
            if self._cuda:
                with torch.cuda.stream(self._copy_stream):
                    began = self._h2d.begin(self._copy_stream)
                    # each stored tensor crosses once, even when several inputs use it (a
                    # model and the same model + LoRA); the inputs are views of the copies
                    on_device = {key: buf.to(self.device, non_blocking=True)
                                 for key, buf in buffers.items()}
                    item.inputs = [_as_tensor(on_device[key], inp.info, inp.rows)
                                   for key, inp in zip(keys, planned.inputs)]
                    if item.lora is not None:
                        item.lora = updates_to(item.lora, self.device, non_blocking=True)
                    self._h2d.end(began, self._copy_stream,
                                  sum(b.numel() for b in on_device.values())
                                  + sum(u.nbytes for u in item.lora or () if u))
                    item.ready = torch.cuda.Event()
                    item.ready.record(self._copy_stream)
            self.stats.read_busy += time.perf_counter() - start
            self._to_compute.put(item)
        self._to_compute.put(_DONE)

    # ----- stage 3: write -----------------------------------------------------------------
    def _write_all(self) -> None:
        while True:
            entry = self._to_write.get()
            if entry is _DONE or self._stop.is_set():  # done, or stopped by an error/signal
                return
            name, out, event, nbytes, recycle = entry
            if event is not None:  # waiting for the GPU is not write time
                event.synchronize()
            start = time.perf_counter()
            self.writer.write(name, out)
            self.stats.bytes_written += out.numel() * out.element_size()
            self.stats.write_busy += time.perf_counter() - start
            for buf in recycle:
                self.pool.give(buf)
            self.budget.release(nbytes)

    # ----- stage 2: compute ---------------------------------------------------------------
    def _job(self, item: _Item):
        return self._job_for(item.planned, item.inputs, self.options.random_seed or 0)

    def _job_for(self, planned, inputs: list[torch.Tensor], seed: int):
        """The kernel job that computes ``planned`` from its input tensors (in the order of
        ``planned.inputs``)."""
        compute_dtype = parse_dtype(planned.compute_dtype) if planned.compute_dtype else None
        if compute_dtype is not None:
            inputs = [t.to(compute_dtype) if t.is_floating_point() else t for t in inputs]
        else:  # float8 inputs are read as float32 (the planner gave them another out dtype)
            inputs = [t.float() if t.dtype in FLOAT8_DTYPES else t for t in inputs]
        out_dtype = SAFETENSORS_DTYPES[planned.out_dtype][0]
        gp = planned.global_params or {}
        ip = planned.input_params or {}
        method = planned.method
        base_index = _base_position(planned)
        base = inputs[base_index] if base_index is not None else None
        others = [k for k in range(len(inputs)) if k != base_index]
        xs = [inputs[k] for k in others]

        def per_input(key: str, default=None):
            values = ip.get(key)
            if values is None:
                return default
            return [values[k] for k in others]

        return make_job(
            method, base, xs,
            weights=per_input("weight"),
            densities=per_input("density", 1.0),
            gammas=per_input("gamma", 0.01),
            normalize=gp.get("normalize"),
            lambda_=float(gp.get("lambda", 1.0)),
            rescale=gp.get("rescale"),
            t=float(gp.get("t", 0.0)),
            scale=gp.get("scale"),
            seed=seed,
            name=planned.name,
            out_dtype=out_dtype,
        )

    def _compute_batch(self, items: list[_Item]) -> None:
        start = time.perf_counter()
        jobs, job_items, fused, results, tails = [], [], [], {}, {}
        for k, item in enumerate(items):
            if item.ready is not None:
                compute_stream = torch.cuda.current_stream(self.device)
                compute_stream.wait_event(item.ready)
                # the device inputs were allocated on the copy stream: without this, the
                # caching allocator could hand their memory to the next H2D copy as soon as
                # this batch drops them, while kernels queued here may still read them
                for t in item.inputs + [t for u in item.lora or () if u for t in u.tensors()]:
                    t.record_stream(compute_stream)
            item.inputs = apply_updates(item.inputs, item.lora)
            if item.planned.method == "copy":
                src = item.inputs[0]
                results[k] = src.to(SAFETENSORS_DTYPES[item.planned.out_dtype][0])
            elif item.planned.method == "fused":
                fused.append(k)
            else:
                item.inputs, tails[k] = split_tail(item.planned, item.inputs)
                jobs.append(self._job(item))
                job_items.append(k)
        if jobs:
            given = None
            if not self._cuda:
                given = [self._pooled_output(job) for job in jobs]
                for k, out in zip(job_items, given):
                    items[k].pooled.append(out)
            try:
                outs = merge_many(jobs, outs=given)
            except NonFiniteError as exc:
                raise _locate_non_finite(exc, [items[k] for k in job_items]) from None
            for k, out in zip(job_items, outs):
                results[k] = join_tail(out, tails[k])
        if fused:
            from mergecore.recipes.evaluate import evaluate_fused

            outs = evaluate_fused([(items[k].planned, items[k].inputs) for k in fused],
                                  self._job_for)
            results.update(zip(fused, outs))
        for k, item in enumerate(items):
            writes = results[k]
            if isinstance(writes, torch.Tensor):
                writes = [(item.planned.name, writes, item.out_bytes)]
            # a pooled buffer goes back once nothing queued for writing lives in it: with the
            # last write that uses it (the writer runs its queue in order), else right now
            by_storage = {b.untyped_storage().data_ptr(): b for b in item.pooled}
            queued = []
            for key, out, nbytes in writes:
                event = None
                if self._cuda:
                    host = self._pooled_tensor(out.shape, out.dtype, self._write_phase(key))
                    stream = torch.cuda.current_stream(self.device)
                    began = self._d2h.begin(stream)
                    host.copy_(out, non_blocking=True)
                    self._d2h.end(began, stream, host.numel() * host.element_size())
                    event = torch.cuda.Event()
                    event.record(stream)
                    out = host
                    by_storage[host.untyped_storage().data_ptr()] = host
                queued.append((key, out, event, nbytes, []))
            if item.ready is not None:  # the pinned inputs' H2D copies must be done first
                item.ready.synchronize()
            for ptr, buf in by_storage.items():
                users = [e for e in queued if e[1].untyped_storage().data_ptr() == ptr]
                if users:
                    users[-1][4].append(buf)
                else:
                    self.pool.give(buf)
            for entry in queued:
                self._to_write.put(entry)
            self.budget.release(item.in_bytes + item.extra_bytes)
            if self.options.progress is not None:
                self.options.progress(item.in_bytes)
            self.stats.tensors += 1
        self.stats.compute_busy += time.perf_counter() - start

    def _pooled_output(self, job) -> torch.Tensor:
        """An output tensor for ``job`` (its out dtype, its inputs' shape) in a pooled buffer,
        placed for a direct write when the writer can do one."""
        ref = job.base if job.base is not None else job.xs[0]
        return self._pooled_tensor(ref.shape, job.out_dtype, self._write_phase(job.name))

    def _write_phase(self, key) -> int | None:
        """The writer's wish for where tensor ``key``'s bytes sit (``direct_phase``)."""
        phase = getattr(self.writer, "direct_phase", None)
        return phase(key) if phase is not None else None

    def _pooled_tensor(self, shape, dtype: torch.dtype, phase: int | None = None
                       ) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        return self.pool.take(nbytes, phase=phase).view(dtype).reshape(shape)

    def _next_item(self) -> Any:
        """The next item from the reader; a Ctrl-C / SIGTERM comes out between waits, never
        while the queue's lock is held (``interrupts_deferred``)."""
        while True:
            with interrupts_deferred():
                try:
                    return self._to_compute.get(timeout=0.1)
                except queue.Empty:
                    pass

    def _compute_all(self) -> None:
        pending: _Item | None = None
        while True:
            item = pending if pending is not None else self._next_item()
            pending = None
            if item is _DONE:
                return
            with interrupts_deferred():  # queues, the pool and the budget take locks
                batch = [item]
                elements = _numel(item)
                while (len(batch) < self.options.batch_tensors
                       and elements < self.options.batch_elements):
                    try:
                        nxt = self._to_compute.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _DONE or elements + _numel(nxt) > self.options.batch_elements:
                        pending = nxt
                        break
                    batch.append(nxt)
                    elements += _numel(nxt)
                self._compute_batch(batch)

    def _fail(self) -> None:
        with interrupts_deferred():
            self._stop.set()
            self.budget.close()
            self._to_compute.put(_DONE)
            self._to_write.put(_DONE)

    def _join_stages(self, stages: list[_Stage],
                     interrupted: BaseException | None = None) -> BaseException | None:
        """Wait for the stage threads to end, also when Ctrl-C or SIGTERM interrupts the wait
        (they raise in this thread): the stages are then told to stop and waited for again,
        so no worker outlives the run (a daemon thread still inside a C++ call when the
        interpreter exits aborts the process). A second interruption, or stages that have
        not stopped ``STOP_WAIT_SECONDS`` after the first, end the wait: the user asked
        twice, or a stage is stuck. ``interrupted``: the run was already interrupted (in the
        compute stage). Returns the interruption, to re-raise."""
        deadline = None if interrupted is None else time.monotonic() + STOP_WAIT_SECONDS
        for stage in stages:
            while not stage.finished.is_set():  # polled: is_set takes no lock
                try:
                    time.sleep(0.02)  # a signal raising here leaves no lock held
                    if deadline is not None and time.monotonic() > deadline:
                        return interrupted  # not stopped in time: leave it (a daemon)
                except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                    if interrupted is not None:
                        return interrupted
                    interrupted = exc
                    self._fail()
                    deadline = time.monotonic() + STOP_WAIT_SECONDS
        return interrupted

    def run(self) -> PipelineStats:
        """Execute the whole plan; re-raises the first error of any stage."""
        start = time.perf_counter()
        reader = _Stage("mergecore-reader", self._read_all, self._fail)
        writer = _Stage("mergecore-writer", self._write_all, self._fail)
        reader.start()
        writer.start()
        compute_error: BaseException | None = None
        try:
            # kernels launch on the current CUDA device: make it the merge's (cuda:1 ...)
            with torch.cuda.device(self.device) if self._cuda else contextlib.nullcontext():
                self._compute_all()
        except BaseException as exc:  # noqa: BLE001
            compute_error = exc
            self._fail()
        finally:
            late: BaseException | None = None
            try:
                with interrupts_deferred():
                    self._to_write.put(_DONE)
            except KeyboardInterrupt as exc:  # held back in the put: stop, then wait
                late = exc
                self._fail()
            interrupted = self._join_stages(
                [reader, writer],
                compute_error if isinstance(compute_error, KeyboardInterrupt) else late)
            if self._adapters is not None:
                self._adapters.close()
        for err in (compute_error, interrupted, reader.error, writer.error):  # first wins
            if err is not None:
                raise err
        self.stats.wall = time.perf_counter() - start
        self.stats.peak_budget_bytes = self.budget.peak
        self.stats.budget_bytes = self.max_memory
        self.stats.extra.update(pool_allocations=self.pool.allocations,
                                pool_reuses=self.pool.reuses)
        if self._cuda:  # GPU-side copy times (the host clocks above only see launches)
            self.stats.extra.update(h2d_busy=self._h2d.seconds(), h2d_bytes=self._h2d.bytes,
                                    d2h_busy=self._d2h.seconds(), d2h_bytes=self._d2h.bytes)
        return self.stats


def _numel(item) -> int:
    n = 1
    for s in item.planned.shape:
        n *= s
    return n


def _base_position(planned) -> int | None:
    """Position of the base among ``planned.inputs`` for the methods that take one."""
    return planned.base_index if planned.method not in ("linear", "passthrough") else None


def _locate_non_finite(exc: NonFiniteError, items: list[_Item]) -> NonFiniteError:
    """``exc`` with the input that holds NaN/Inf named by model and file (``ops`` knows only
    its position among the job's inputs: the base first, then the others in plan order)."""
    if exc.input_index is None:
        return exc
    for item in items:
        planned = item.planned
        if planned.name != exc.tensor:
            continue
        base = _base_position(planned)
        order = ([base] if base is not None else []) + [
            k for k in range(len(planned.inputs)) if k != base]
        inp = planned.inputs[order[exc.input_index]]
        where = f"file {str(inp.info.file)!r}, tensor {inp.info.name!r}"
        if inp.adapter is not None:  # the weight from the file, or the adapter's update
            where += f", with the LoRA update of adapter {inp.adapter!r}"
        return NonFiniteError(
            f"tensor {exc.tensor!r}: input {inp.model!r} has {exc.count} NaN/Inf value(s) out "
            f"of {exc.numel} ({where})",
            tensor=exc.tensor, input_index=exc.input_index, count=exc.count, numel=exc.numel)
    return exc
