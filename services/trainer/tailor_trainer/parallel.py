"""Data-parallel training across the GPUs of one pod (or, for tests, across CPU processes).

`launch(world_size, target, args, progress)` starts `world_size` rank processes (torch.multiprocessing,
spawn), joins them into one torch.distributed process group (NCCL on GPUs, rank r on cuda:r; gloo on
CPU) and runs `target(parallel, *args, progress=...)` in each. Every rank builds the same full batch of
step k (`batch_at(step)` is a function of (seed, k)), keeps its rows r, r+N, r+2N, ... (`shard`), and
after backward `average_gradients` turns its gradient into the gradient of the whole batch, so each
optimizer step equals the one a single process takes on the full batch, up to float summation order.
The run is therefore the same run as on one GPU: same loss curve, same adapter, same checkpoints, only
faster. Rank 0 alone reports progress and saves checkpoints; every rank restores from the same one.

Errors in any rank fail the whole run with that rank's message; the parent never leaves a rank process
running (finished, failed or cancelled). Cancellation reaches rank 0 through its progress calls, so it
checkpoints as a one-process run does before the others are stopped.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tailor_runtime.errors import Cancelled, TailorError
from tailor_runtime.progress import ProgressFn

# How long the parent waits for rank 0 to checkpoint and stop after a cancel, and for the other ranks to
# exit after rank 0 reported its result, before it terminates them.
CANCEL_GRACE_S = 120.0
EXIT_GRACE_S = 30.0


@dataclass
class DataParallel:
    """One rank's view of the process group: which rows it trains on and how gradients are combined."""

    rank: int
    world_size: int
    group: Any = None  # torch.distributed process group (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's rows (r, r+N, ...) of every tensor with the batch dimension (the 4-D attention
        mask included), with `real_tokens` recounted for those rows. Rows are independent sequences (a
        packed row's mask never reaches into another row), so the shards together are the batch."""
        rows = int(batch["input_ids"].shape[0])
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if hasattr(value, "shape") and len(value.shape) >= 1 and int(value.shape[0]) == rows:
                out[key] = value[self.rank :: self.world_size]
            else:
                out[key] = value
        if "row_tokens" in out:
            out["real_tokens"] = int(out["row_tokens"].sum())
        else:  # plain-text windows: every position is a real token
            out["real_tokens"] = int(out["input_ids"].numel())
        return out

    def average_gradients(self, params: list[Any], n_labelled: int, loss: float) -> tuple[float, int]:
        """Make every rank's `.grad` the gradient of the full batch's mean loss; returns (that mean loss,
        the labelled positions of the full batch).

        Each rank's loss is the mean over its own n_r labelled positions, so the full batch's gradient is
        sum_r(n_r * grad_r) / sum_r(n_r). The scaled gradients, n_r * loss_r and n_r travel in one
        flattened buffer through a single all-reduce (SUM). A rank with no rows or no labelled positions
        passes zeros (its parameters may have no .grad at all) but still joins the collective.

        This is the gradient all-reduce DistributedDataParallel does, done explicitly: only the trainable
        parameters (LoRA adapters, or QAT's weights) take part, without DDP's module wrapper around a peft
        model, and with the token weighting that DDP's plain average over ranks lacks (ranks of a packed
        or instruction batch have different numbers of labelled positions)."""
        import torch
        import torch.distributed as dist

        device = params[0].device if params else torch.device("cpu")
        numels = [p.numel() for p in params]
        flat = torch.zeros(sum(numels) + 2, dtype=torch.float32, device=device)
        offset = 0
        for p, n in zip(params, numels, strict=True):
            if p.grad is not None and n_labelled:
                flat[offset : offset + n].copy_(p.grad.reshape(-1)).mul_(n_labelled)
            offset += n
        flat[-2] = float(loss) * n_labelled if n_labelled else 0.0
        flat[-1] = float(n_labelled)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        total = int(round(float(flat[-1])))
        if total:
            flat[:-2].div_(total)
        offset = 0
        for p, n in zip(params, numels, strict=True):
            grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += n
        return (float(flat[-2]) / total if total else 0.0), total


def _free_threads(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _remote_error(rank: int, type_name: str, message: str, trace: str) -> Exception:
    """The exception a rank raised, as the parent raises it: Tailor's own errors keep their type (so the
    operation gets the right status code), anything else becomes a RuntimeError carrying the traceback."""
    from tailor_runtime import errors

    cls = getattr(errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, TailorError | Cancelled):
        try:
            return cls(f"rank {rank}: {message}")
        except TypeError:  # an error type with extra required arguments
            pass
    return RuntimeError(f"data-parallel rank {rank} failed: {type_name}: {message}\n{trace}")


def _rank_main(rank, world_size, store_path, backend, threads, target, args, messages, cancel) -> None:
    """Entry point of one rank process."""
    try:
        import torch
        import torch.distributed as dist

        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(threads)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        parallel = DataParallel(rank, world_size)

        def progress(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
            if cancel.is_set():
                raise Cancelled("operation cancelled")
            if rank == 0:
                messages.put(("progress", rank, (percent, phase, message), metrics))

        result = target(parallel, *args, progress=progress)
        messages.put(("result", rank, result if rank == 0 else None, None))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        messages.put(("error", rank, (type(exc).__name__, str(exc), traceback.format_exc()), None))


def _raise_if_a_rank_died(procs: list) -> None:
    for rank, proc in enumerate(procs):
        if proc.exitcode not in (None, 0):  # killed (e.g. out of memory) before it could report
            raise RuntimeError(
                f"data-parallel rank {rank} exited with code {proc.exitcode} without reporting"
            )


def launch(
    world_size: int,
    target: Callable[..., Any],
    args: tuple,
    progress: ProgressFn,
    *,
    backend: str | None = None,
) -> Any:
    """Run `target(parallel, *args, progress=...)` in `world_size` rank processes; rank 0's return value.

    `target` and `args` must be picklable (a module-level function and plain data): the ranks are fresh
    interpreters (spawn; CUDA cannot be forked). Rank 0's progress reaches `progress` here; when it raises
    Cancelled, rank 0 is told at its next report, saves its checkpoint and stops, and the others are
    terminated. The ranks meet through a FileStore in a private temporary folder rather than a TCP port:
    all ranks are on this host, and no port can be taken by someone else between choosing and binding it.
    """
    import torch
    import torch.multiprocessing as mp

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        from tailor_runtime.errors import FailedPrecondition

        raise FailedPrecondition(
            f"data_parallel {world_size} needs {world_size} GPUs; this pod sees {torch.cuda.device_count()}"
        )
    context = mp.get_context("spawn")
    messages = context.Queue()
    cancel = context.Event()
    folder = tempfile.mkdtemp(prefix="tailor-ddp-")
    threads = _free_threads(world_size)
    procs = [
        context.Process(
            target=_rank_main,
            args=(
                rank,
                world_size,
                os.path.join(folder, "store"),
                backend,
                threads,
                target,
                args,
                messages,
                cancel,
            ),
            name=f"tailor-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    cancelled_at: float | None = None
    try:
        for proc in procs:
            proc.start()
        while True:
            try:
                kind, rank, payload, metrics = messages.get(timeout=0.2)
            except queue_module.Empty:
                _raise_if_a_rank_died(procs)
                if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    raise Cancelled("operation cancelled") from None
                continue
            if kind == "progress":
                if cancelled_at is None:
                    try:
                        progress(*payload, **metrics)
                    except Cancelled:
                        cancel.set()
                        cancelled_at = time.monotonic()
            elif kind == "result":
                if rank != 0:  # the others are done; rank 0 may still be saving and evaluating
                    continue
                deadline = time.monotonic() + EXIT_GRACE_S
                for proc in procs:
                    proc.join(timeout=max(0.0, deadline - time.monotonic()))
                return payload
            else:
                # A rank that died without a word makes the others' collectives fail ("connection reset"):
                # that death, not its echo, is the cause to report.
                time.sleep(1.0)
                _raise_if_a_rank_died(procs)
                raise _remote_error(rank, *payload)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        messages.close()
        shutil.rmtree(folder, ignore_errors=True)
