"""Candidate measurements on several processes (``device.workers``, ``--workers N``) with ``torch.distributed``.

Model: SPMD. Every rank (process) runs the same pipeline on its own model replica; every stage is deterministic,
so every rank reaches ``ctx.executor.map(fn, tasks)`` with the same task list. Only that map is split: rank r
computes tasks r, r + N, r + 2N, ... (round-robin: neighbouring tasks, e.g. the formats of one node, cost about
the same) and ``all_gather_object`` hands every rank all results, put back in task order. The candidates — and
so the output bytes — do not depend on N. Only rank 0 writes files and reports progress; the result returned
is rank 0's. Every map is in a stage's measurements, so a worker stops once the last stage has measured (its
``optimize`` returns None): validation, the test verdict and the writing are rank 0's alone, and no worker
competes with rank 0 for the CPUs meanwhile.

Launch
------
* ``optimize(..., config with device.workers = N)`` in a plain process (the CLI, a script): this process
  becomes rank 0 and starts N − 1 workers itself (``torch.multiprocessing``, spawn; a ``TCPStore`` on a free
  local port joins them); a script that calls it must guard its entry point (``if __name__ == "__main__":``),
  as with any spawned worker. When rank 0 is done, any worker still running is stopped.
* Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) or inside a process group the caller
  created, every rank calls ``optimize`` with the same arguments and joins that group; ``device.workers`` is
  then the group's size (give it equal to ``--nproc-per-node`` × nodes, or leave it at 1)::

      torchrun --nproc-per-node 4 -m llc_onnx optimize model.onnx --data d.npz -o out.onnx --device cuda

Backends: gloo on CPU; NCCL when ``device.device`` is ``cuda`` — one GPU per worker, rank r on
``cuda:LOCAL_RANK`` (``cuda:r`` when spawned here). The gathered payload is a list of small result objects.

Threads and identical bytes
---------------------------
Float results of some torch kernels (the backward of the gradient pass, BLAS reductions) change in the last
bits with the number of intra-op threads, which can move a rounding decision. So the output is a function of the
*threads per worker*: runs with the same ``device.threads`` give the same bytes for any number of workers.
``device.threads = 0`` with several workers means ``max(1, CPUs // N)`` threads per worker (N workers × T threads
never oversubscribe the CPUs); give ``--threads`` explicitly to compare runs with different worker counts.

Failures: an exception inside a task is gathered too, so every rank raises (the failing rank its own exception,
the others an :class:`LLCError` naming the worker); a worker that dies closes its sockets and the others' next
collective fails, which rank 0 reports with the worker's own error when it has one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import signal
import sys
import tempfile
from typing import Any, Callable

from .. import tempdirs
from ..errors import LLCError

log = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(hours=2)  # longest wait for the slowest rank at one collective


@dataclasses.dataclass
class _Pending:
    """A group this module launched, made at the first collective (so rank 0 loads and measures its gradients
    while the spawned workers are still importing): the store, this rank, the size, and on rank 0 the worker
    processes (to fail fast when one ends before joining)."""

    store: Any
    backend: str
    rank: int
    size: int
    processes: Any = None


_state: dict[str, Any] = {"running": False, "pending": None}


# ------------------------------------------------------------------------------------------- the group
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def world() -> tuple[int, int]:
    """(rank, world size) of this run's ranks: the default process group, or the group this module is about to
    make; (0, 1) without one."""
    pending = _state["pending"]
    if pending is not None:
        return pending.rank, pending.size
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_primary() -> bool:
    """True on rank 0 (and in a plain process): the rank that writes files and prints — also after the run,
    under torchrun (``RANK``), once the group is gone."""
    rank, size = world()
    if size > 1:
        return rank == 0
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _ensure_group() -> None:
    """Make the pending group (all ranks meet here at their first collective)."""
    dist, pending = _dist(), _state["pending"]
    if pending is None or dist.is_initialized():
        return
    if pending.processes is not None:
        _wait_ready(pending)
    dist.init_process_group(pending.backend, store=pending.store, rank=pending.rank, world_size=pending.size,
                            timeout=_TIMEOUT)


class Distributed:
    """``map(fn, tasks)`` across the ranks (module doc): rank r runs tasks r, r + N, ...; every rank returns all
    results in task order."""

    def __init__(self):
        self.rank, self.size = world()

    def _gather(self, obj) -> list:
        _ensure_group()
        out: list = [None] * self.size
        _dist().all_gather_object(out, obj)
        return out

    def map(self, fn: Callable, tasks) -> list:
        tasks = list(tasks)
        digest = hashlib.sha256(repr(tasks).encode()).hexdigest()
        fingerprints = self._gather((len(tasks), digest))
        if len(set(fingerprints)) > 1:
            raise LLCError(f"workers: the ranks hold different task lists ({[f[0] for f in fingerprints]} tasks); "
                           "every rank must run optimize with the same model, data and configuration")
        mine, error, failed = [], None, None
        from ..memory import TASK_TRIM_BYTES, drop_mapped_pages, trim

        for i in range(self.rank, len(tasks), self.size):
            try:
                mine.append(fn(tasks[i]))
                drop_mapped_pages()
                trim(TASK_TRIM_BYTES)
            except Exception as exc:  # noqa: BLE001 - gathered, then raised on every rank
                error = exc
                first = (str(exc).strip().splitlines() or [""])[0]
                failed = (i, type(exc).__name__, first, isinstance(exc, LLCError))
                break
        gathered = self._gather(failed if failed else mine)
        if error is not None:
            raise error
        for r, part in enumerate(gathered):
            if isinstance(part, tuple):
                i, kind, msg, llc = part
                if llc:
                    raise LLCError(f"worker {r} (task {i}): {msg}")
                raise RuntimeError(f"worker {r} (task {i}): {kind}: {msg}")
        out: list = [None] * len(tasks)
        for r, part in enumerate(gathered):
            out[r::self.size] = part
        return out


def executor():
    """The executor of candidate measurements: :class:`Distributed` when this run has several ranks, else the
    in-process ``Sequential`` one."""
    from .context import Sequential

    return Distributed() if world()[1] > 1 else Sequential()


# ------------------------------------------------------------------------------------------- launching
def needs_launch(config) -> bool:
    """Whether ``optimize`` must set up ranks first: several workers asked for, or a torchrun environment /
    an existing group of several ranks, and not already inside a distributed run."""
    if _state["running"]:
        return False
    return config.device.workers > 1 or _env_world() > 1 or world()[1] > 1


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_config(config, rank: int, size: int, local_rank: int):
    """``config`` as rank ``rank`` of ``size`` runs it: threads per worker resolved (module doc), one GPU per
    worker (``cuda:local_rank``)."""
    from ..config import ConfigError

    dev = config.device
    if dev.workers > 1 and dev.workers != size:
        raise ConfigError("device.workers", dev.workers, f"this process is one of {size} ranks (torchrun or an "
                          f"existing process group); give {size} or leave it at 1")
    device = dev.device
    if device.startswith("cuda") and size > 1:
        import torch

        if device != "cuda":
            raise ConfigError("device.device", device, "with several workers give cuda: each worker takes one GPU "
                              "(cuda:0 … cuda:N-1)")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError("device.workers", size, f"{count} GPU(s) visible; one worker per GPU")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if _env_world() > 1 else size
    threads = dev.threads or max(1, cpu_count() // local_size)
    return dataclasses.replace(config, device=dataclasses.replace(dev, device=device, threads=threads,
                                                                  workers=size))


def optimize(run: Callable, model, data, config, *, held=None, val=None, out=None, progress=None):
    """``run`` (``api.optimize``) on ``config.device.workers`` ranks, or on the ranks of torchrun / the
    caller's process group (module doc). Returns rank 0's result (each rank its own under torchrun)."""
    dist = _dist()
    if dist is None:
        raise LLCError("device.workers: torch.distributed is not available in this torch build; use --workers 1")
    if dist.is_initialized() or _env_world() > 1:
        return _join(run, model, data, config, held=held, val=val, out=out, progress=progress)
    return _spawn(run, model, data, config, held=held, val=val, out=out, progress=progress)


def _run_as_rank(run, model, data, config, *, rank, size, local_rank, held, val, out, progress):
    from ..progress import Silent

    cfg = rank_config(config, rank, size, local_rank)
    _state["running"] = True
    try:
        return run(model, data, cfg, held=held, val=val, out=out if rank == 0 else None,
                   progress=progress if rank == 0 else Silent())
    finally:
        _state["running"] = False


def _join(run, model, data, config, **kw):
    """Inside torchrun or an existing group: every rank runs ``run``; a group made here is destroyed after."""
    dist = _dist()
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(_backend(config.device.device), timeout=_TIMEOUT)
    try:
        rank, size = world()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return _run_as_rank(run, model, data, config, rank=rank, size=size, local_rank=local, **kw)
    finally:
        if own:
            dist.destroy_process_group()


def _portable(model, data, held, val, tmp: str):
    """Arguments a spawned worker can receive: the model as a path (an in-memory model is saved to ``tmp``),
    data as paths or :class:`~llc_onnx.calib.data.Dataset` (a reader or an iterable is read here, once)."""
    from ..api import load
    from ..calib.data import Dataset, load_dataset
    from ..model_io import save_model

    proto = None
    if not isinstance(model, (str, os.PathLike)):
        proto, _ = load(model)
        path = os.path.join(tmp, "model.onnx")
        save_model(proto, path)
        model = path

    def portable(spec):
        nonlocal proto
        if spec is None or isinstance(spec, (str, os.PathLike, Dataset)):
            return spec
        if proto is None:
            proto, _ = load(model)
        return load_dataset(spec, proto)

    return model, portable(data), portable(held), portable(val)


def _spawn(run, model, data, config, *, held, val, out, progress):
    """This process is rank 0; ranks 1..N-1 are spawned (``torch.multiprocessing``) and stopped at the end."""
    import torch.multiprocessing as mp

    dist = _dist()
    size = config.device.workers
    backend = _backend(config.device.device)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=_TIMEOUT, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix=tempdirs.prefix("workers")) as tmp:
        w_model, w_data, w_held, w_val = _portable(model, data, held, val, tmp)
        procs = mp.start_processes(_worker, args=(store.port, size, w_model, w_data, config, w_held, w_val),
                                   nprocs=size - 1, join=False, start_method="spawn")
        _state["pending"] = _Pending(store, backend, 0, size, procs)
        try:
            return _run_as_rank(run, model, w_data, config, rank=0, size=size, local_rank=0, held=w_held,
                                val=w_val, out=out, progress=progress)
        except RuntimeError as exc:  # a collective failed: a worker died; say which and why
            raise _worker_error(procs) or exc
        finally:
            _state["pending"] = None
            if dist.is_initialized():
                dist.destroy_process_group()
            _stop(procs)


def _wait_ready(pending: _Pending) -> None:
    """Wait until every spawned worker has imported llc-onnx and reached the store, failing fast (with the
    worker's error) when one ends first."""
    import time

    keys = [f"ready{r}" for r in range(1, pending.size)]
    while not pending.store.check(keys):
        err = _worker_error(pending.processes, wait=0)
        if err is not None:
            raise err
        time.sleep(0.05)


def _worker_error(procs, wait: float = 5) -> LLCError | None:
    """The first worker's own error (the last line of its exception), or how it ended, if one ended badly."""
    for i, p in enumerate(procs.processes):
        p.join(timeout=wait)
        if p.exitcode not in (None, 0):
            msg = f"exit code {p.exitcode}"
            try:
                import pickle

                with open(procs.error_files[i], "rb") as f:
                    msg = pickle.load(f)["traceback"].strip().splitlines()[-1]
            except Exception:  # noqa: BLE001 - no error file: it was killed
                pass
            return LLCError(f"worker {i + 1} failed: {msg}")
    return None


def _stop(procs) -> None:
    """Stop the spawned workers (SIGTERM: a running worker exits through its ``finally`` blocks), then reap
    them. Whatever they had left to do only repeats rank 0's finished stages."""
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    for p in procs.processes:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()


def _worker(index: int, port: int, size: int, model, data, config, held, val) -> None:
    """Entry point of spawned rank ``index + 1``: the same pipeline, nothing written, group made lazily."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    dist = _dist()
    rank = index + 1
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=_TIMEOUT)
    from ..api import optimize as run

    store.set(f"ready{rank}", "1")
    _state["pending"] = _Pending(store, _backend(config.device.device), rank, size)
    try:
        _run_as_rank(run, model, data, config, rank=rank, size=size, local_rank=rank, held=held, val=val, out=None,
                     progress=None)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # done: a stop now just ends the process
        _state["pending"] = None
        if dist.is_initialized():
            dist.destroy_process_group()
