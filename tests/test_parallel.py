"""``device.workers``: candidate measurements sharded across processes with torch.distributed (gloo on CPU).

The executor is checked on a real 2-rank gloo group (this process is rank 0, one spawned process is rank 1):
each rank computes its round-robin share, every rank gets all results in task order, and a task that fails on
one rank fails the map on every rank with that rank's message. End to end, ``optimize`` with 2 workers writes
the same bytes and the same candidate table as with 1 worker (same threads per worker).
"""

import dataclasses
import os

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import llc_onnx
from _models import torch_threads, write_mlp_files
from llc_onnx.config import ConfigError, CriterionConfig, DeviceConfig, OptimizeConfig, QuantConfig
from llc_onnx.errors import LLCError
from llc_onnx.flows import parallel


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------------- executor
def _task(x):
    if x == "fail":
        raise LLCError("node 'n7': this task fails on purpose; nothing to do")
    return (x, os.getpid())


def _rank_main(index, port, tasks):
    """Rank index + 1 of a 2-rank gloo group: runs the same map as rank 0."""
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=index + 1, world_size=2)
    try:
        parallel.Distributed().map(_task, tasks)
    except LLCError:
        pass
    finally:
        dist.destroy_process_group()


def _map_on_two_ranks(tasks):
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    procs = mp.start_processes(_rank_main, args=(store.port, tasks), nprocs=1, join=False, start_method="spawn")
    dist.init_process_group("gloo", store=store, rank=0, world_size=2)
    try:
        assert parallel.world() == (0, 2)
        assert isinstance(parallel.executor(), parallel.Distributed)
        return parallel.Distributed().map(_task, tasks)
    finally:
        dist.destroy_process_group()
        procs.join(60)


def test_distributed_map_round_robin_in_task_order():
    tasks = [f"t{i}" for i in range(7)]
    out = _map_on_two_ranks(tasks)
    assert [x for x, _ in out] == tasks  # every result, in task order
    pids = [pid for _, pid in out]
    assert pids[0::2] == [os.getpid()] * 4  # rank 0: tasks 0, 2, 4, 6
    assert len(set(pids[1::2])) == 1 and pids[1] != os.getpid()  # rank 1 (another process): 1, 3, 5
    assert parallel.world() == (1 - 1, 1) and not isinstance(parallel.executor(), parallel.Distributed)


def test_a_task_failing_on_one_rank_fails_every_rank():
    with pytest.raises(LLCError, match=r"^worker 1 \(task 3\): node 'n7': this task fails on purpose"):
        _map_on_two_ranks(["a", "b", "c", "fail", "e"])


def _dying_task(x):
    if x == 3 and dist.get_rank() == 1:
        os._exit(7)  # a worker killed mid-run (out of memory, a signal)
    return x


def _dying_rank(index, port):
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    store.set("ready1", "1")
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    parallel.Distributed().map(_dying_task, list(range(8)))


def test_a_worker_that_dies_is_reported_not_waited_for():
    """The group is made at the first collective (``_Pending``); the dead worker's closed sockets fail rank 0's
    gather at once, and rank 0 names the worker and how it ended."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    procs = mp.start_processes(_dying_rank, args=(store.port,), nprocs=1, join=False, start_method="spawn")
    parallel._state["pending"] = parallel._Pending(store, "gloo", 0, 2, procs)
    try:
        with pytest.raises(RuntimeError):
            parallel.Distributed().map(_dying_task, list(range(8)))
        assert str(parallel._worker_error(procs)) == "worker 1 failed: exit code 7"
    finally:
        parallel._state["pending"] = None
        if dist.is_initialized():
            dist.destroy_process_group()
        parallel._stop(procs)


# ------------------------------------------------------------------------------------------- optimize
def _config(workers, threads=1, **quant):
    return OptimizeConfig(quant=QuantConfig(**quant), device=DeviceConfig(threads=threads, workers=workers),
                          criterion=CriterionConfig(allow_loss_increase=True))


def test_two_workers_write_the_same_bytes_and_candidates(tmp_path):
    model, data = write_mlp_files(tmp_path, n=600, hidden=48)
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}.onnx"
        res = llc_onnx.optimize(model, data, _config(w, budget=0.3), out=str(out))
        runs[w] = (out.read_bytes(), [c.to_dict() for c in res.stages[0].candidates], res)
    assert runs[1][0] == runs[2][0]
    assert runs[1][1] == runs[2][1] and len(runs[1][1]) > 4
    assert runs[2][2].config.device.workers == 2 and runs[2][2].config.device.threads == 1
    assert not dist.is_initialized()  # the group is gone after the run


def test_workers_with_an_in_memory_model_and_reader(tmp_path):
    """Arguments that cannot travel to a spawned worker as they are (a ModelProto, a reader object) are saved /
    read once in this process first; the result equals the single-process one."""
    import onnx

    model, data = write_mlp_files(tmp_path, n=256)
    proto = onnx.load(model)
    with np.load(data) as z:
        arrays = {k: z[k] for k in z.files}

    class Reader:
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= 8:
                return None
            s = slice(32 * self.i, 32 * (self.i + 1))
            self.i += 1
            return {k: v[s] for k, v in arrays.items()}

    outs = []
    for w in (1, 2):
        res = llc_onnx.optimize(proto, Reader(), _config(w, bits=(4, 8, "float")))
        outs.append(res.model.SerializeToString())
    assert outs[0] == outs[1]


def test_worker_settings_are_checked():
    with pytest.raises(ConfigError, match="device.workers"):
        DeviceConfig(workers=0)
    cfg = _config(1, threads=0)
    r = parallel.rank_config(cfg, 0, 2, 0)
    assert r.device.threads == max(1, parallel.cpu_count() // 2) and r.device.workers == 2
    with pytest.raises(ConfigError, match="device.workers 3: this process is one of 2 ranks"):
        parallel.rank_config(dataclasses.replace(cfg, device=DeviceConfig(workers=3)), 0, 2, 0)
    with pytest.raises(ConfigError, match="device.device"):
        parallel.rank_config(dataclasses.replace(cfg, device=DeviceConfig(device="cuda:1", workers=2)), 0, 2, 0)


def test_two_workers_share_the_gram_pass_and_write_the_same_bytes(tmp_path):
    """GPTQ's input Gram matrices are collected node-sharded across the ranks (each node's matrix summed as in
    one pass): the same codes and bytes as one worker."""
    model, data = write_mlp_files(tmp_path, n=400, hidden=48)
    outs = {}
    for w in (1, 2):
        out = tmp_path / f"g{w}.onnx"
        cfg = _config(w, bits=(2, 4, "float"), rounding="gptq", budget=0.2)
        res = llc_onnx.optimize(model, data, cfg, out=str(out))
        assert "gram" in res.seconds
        outs[w] = out.read_bytes()
    assert outs[1] == outs[2]


def test_two_workers_with_rounding_probes_write_the_same_bytes(tmp_path):
    """``--rounding-probe``: the probes are one map over the ranks, the rest a second one chosen from the probes'
    gathered results (the same on every rank): the same candidates and bytes as one worker."""
    model, data = write_mlp_files(tmp_path, n=600, hidden=48)
    runs = {}
    for w in (1, 2):
        out = tmp_path / f"p{w}.onnx"
        res = llc_onnx.optimize(model, data, _config(w, bits=(2, 4, "float"), budget=0.3, rounding_probe=1),
                                out=str(out))
        assert {lv: i["nodes"] for lv, i in res.stages[0].settings["rounding_per_level"].items()} == \
            {lv: 1 for lv in res.stages[0].settings["rounding_per_level"]}
        runs[w] = (out.read_bytes(), [c.to_dict() for c in res.stages[0].candidates])
    assert runs[1] == runs[2]
