"""``llc_onnx.memory``: spilled gradient passes (files mapped back read-only) give the same run, bit for bit, and
their pages leave the process's memory between tasks."""

import numpy as np
import pytest

import llc_onnx
from _models import torch_threads, write_mlp_files
from llc_onnx import memory
from llc_onnx.config import CriterionConfig, DeviceConfig, OptimizeConfig, QuantConfig
from llc_onnx.flows import context


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


def test_spilled_arrays_hold_the_same_values_and_drop_their_pages():
    arr = np.random.default_rng(0).normal(size=(2048, 1024)).astype(np.float32)  # 8 MB
    spill = memory.Spill()
    m = spill.put(arr)
    assert isinstance(m, np.memmap) and not m.flags.writeable
    np.testing.assert_array_equal(m, arr)
    touched = _rss_file_kb()
    memory.drop_mapped_pages()
    assert _rss_file_kb() <= touched - 6000  # the 8 MB read above left this process's memory
    np.testing.assert_array_equal(m, arr)  # and is read back from the file when used again
    d = spill.dir
    del spill, m
    memory.release()
    import os

    assert not os.path.exists(d)


def test_weights_spill_keeps_its_pages_between_tasks_and_gives_them_back_on_release():
    """The interpreter's file-backed weights (``Spill(between_tasks=False)``, copy-on-write maps): every
    measurement task reads them, so ``drop_mapped_pages()`` between tasks leaves them; ``release()`` — before a
    session or a stage — drops them too. A writable accumulator (``Spill.zeros``) keeps what was written."""
    arr = np.random.default_rng(1).normal(size=(2048, 1024)).astype(np.float32)  # 8 MB
    weights = memory.Spill(between_tasks=False)
    w = weights.put(arr, mode="c")
    assert w.flags.writeable and np.array_equal(w, arr)  # (torch.from_numpy takes it without a warning)
    touched = _rss_file_kb()
    memory.drop_mapped_pages()
    assert _rss_file_kb() >= touched - 1000  # still resident between tasks
    memory.release()
    assert _rss_file_kb() <= touched - 6000  # gone on release
    assert np.array_equal(w, arr)
    acc = memory.Spill().zeros((2048, 1024), np.float32)
    acc += arr
    memory.drop(acc)
    acc += arr
    memory.drop(acc)
    assert np.array_equal(acc, 2 * arr)  # a shared map's pages dropped after an update keep the values
    assert memory.bound_heap() is True  # glibc here: mallopt accepted


def test_a_run_with_spilled_gradients_writes_the_same_bytes(tmp_path, monkeypatch):
    model, data = write_mlp_files(tmp_path, n=320)
    cfg = OptimizeConfig(quant=QuantConfig(bits=(4, 8, 16, "float"), sweep=(0.4,)), device=DeviceConfig(threads=1),
                         criterion=CriterionConfig(allow_loss_increase=True))
    with torch_threads(1):
        plain = llc_onnx.optimize(model, data, cfg)
        monkeypatch.setattr(context, "SPILL_BYTES", 0)
        spilled = llc_onnx.optimize(model, data, cfg)
    assert spilled.model.SerializeToString() == plain.model.SerializeToString()
    assert [c.to_dict() for c in spilled.stages[0].candidates] == [c.to_dict() for c in plain.stages[0].candidates]


def test_a_run_with_spilled_gram_matrices_writes_the_same_bytes(tmp_path, monkeypatch):
    """GPTQ's input Gram matrices accumulated in files (as on a large model: ``collect_grams(spill=)``, kept as a
    ``_GramDict`` of file maps) give the same codes."""
    from llc_onnx.calib import gram as gram_mod
    from llc_onnx.flows import roundings

    model, data = write_mlp_files(tmp_path, n=320)
    cfg = OptimizeConfig(quant=QuantConfig(bits=(2, 4, "float"), rounding="gptq"), device=DeviceConfig(threads=1),
                         criterion=CriterionConfig(allow_loss_increase=True))
    made = []
    real = gram_mod.collect_grams

    def collect(*args, **kwargs):
        made.append((kwargs.get("spill"), real(*args, **kwargs)))
        return made[-1][1]
    monkeypatch.setattr(gram_mod, "collect_grams", collect)
    with torch_threads(1):
        plain = llc_onnx.optimize(model, data, cfg)
        monkeypatch.setattr(context, "SPILL_BYTES", 0)
        spilled = llc_onnx.optimize(model, data, cfg)
    assert [spill is not None for spill, _ in made] == [False, True]
    assert all(isinstance(g.gram, np.memmap) and g.gram.filename.startswith(made[1][0].dir)
               for g in made[1][1].values())
    assert spilled.model.SerializeToString() == plain.model.SerializeToString()
    assert [c.to_dict() for c in spilled.stages[0].candidates] == [c.to_dict() for c in plain.stages[0].candidates]


def test_released_interpreter_weights_are_read_again_from_the_model(tmp_path):
    """After the last measurement the interpreter's copy of the weights is dropped; a later weight or run reads
    them from the model, with the same values and outputs."""
    import torch

    from llc_onnx.calib.data import load_dataset
    from llc_onnx.flows.context import create_context
    from llc_onnx.model_io import load_model

    model, data = write_mlp_files(tmp_path, n=64)
    with torch_threads(1):
        ctx = create_context(model, data, OptimizeConfig(device=DeviceConfig(threads=1)))
        x = torch.from_numpy(load_dataset(data, load_model(model)).batches[0].inputs["x"])
        before = ctx.graph.run({"x": x})[0]["logits"].detach().clone()
        weights = {n.name: ctx.weight_array(n).copy() for n in ctx.nodes}
        ctx.release_interpreter()
        assert ctx.graph.params_released and ctx._snapshots is None
        for n in ctx.nodes:  # read from the proto, not by making every tensor again
            np.testing.assert_array_equal(ctx.weight_array(n), weights[n.name])
            assert ctx.weight_array(n).dtype == np.float64
        assert ctx.graph.params_released
        np.testing.assert_array_equal(ctx.graph.run({"x": x})[0]["logits"].detach(), before)
        assert not ctx.graph.params_released


def test_chunked_delta_sums_equal_the_whole_array_sums(monkeypatch):
    from llc_onnx.flows import quantize

    rng = np.random.default_rng(0)
    w = rng.normal(size=(300, 70))
    q = (w + rng.normal(scale=0.01, size=w.shape)).astype(np.float32)
    g = rng.normal(size=w.shape).astype(np.float32)
    d = q.astype(np.float64) - w
    monkeypatch.setattr(quantize, "DELTA_CHUNK", 1000)  # 21 chunks, the last one short
    gd, dd = quantize._delta_sums(g, q, w)
    assert gd == pytest.approx(float((g * d).sum()), rel=1e-12) and dd == pytest.approx(float((d * d).sum()), rel=1e-12)


@pytest.mark.parametrize("method, quant", [("quant", QuantConfig(bits=(2, 4, 8, "float"))),
                                           ("series", QuantConfig(budget=0.4))])
def test_a_run_with_spilled_plan_codes_writes_the_same_bytes(tmp_path, monkeypatch, method, quant):
    """On a large model the codes every plan is built from (``quantize.CodeMemo``) live in files mapped back
    read-only; the written model is the same, bit for bit, and no float weight is kept beside the codes once the
    joint re-solve is done."""
    from llc_onnx.flows import quantize

    model, data = write_mlp_files(tmp_path, n=320, hidden=256)
    cfg = OptimizeConfig(method=(method,), quant=quant, device=DeviceConfig(threads=1),
                         criterion=CriterionConfig(allow_loss_increase=True))
    memos = []
    real = quantize.CodeMemo.__init__
    monkeypatch.setattr(quantize.CodeMemo, "__init__", lambda self, spill=False: memos.append(self) or real(self, spill))
    with torch_threads(1):
        plain = llc_onnx.optimize(model, data, cfg)
        monkeypatch.setattr(quantize, "SPILL_BYTES", 0)
        monkeypatch.setattr(quantize, "SPILL_MIN_BYTES", 1024)
        spilled = llc_onnx.optimize(model, data, cfg)
    assert [m.spill is not None for m in memos] == [False, True]
    for m in memos:
        assert len(m) > 0 and all(dq is None for _, dq in m.values())  # codes only after the joint re-solve
    arrays = [t.q for c, _ in memos[1].values() for t in (c.terms if method == "series" else [c])]
    assert any(isinstance(q, np.memmap) for q in arrays)
    assert all(isinstance(q, np.memmap) for q in arrays if q.nbytes >= 1024)
    assert spilled.model.SerializeToString() == plain.model.SerializeToString()


def test_trim_gives_free_heap_memory_back_only_past_its_threshold():
    """Node-sized temporaries freed between measurement tasks stay in glibc's heap (RSS) until ``malloc_trim``;
    ``memory.trim(min_free)`` returns them once the heap holds at least ``min_free`` free bytes, and leaves a heap
    with less alone (no pages given back and faulted in again after every task)."""
    import sys

    from llc_onnx import memory

    if not sys.platform.startswith("linux") or not memory._glibc() or not memory._mallinfo2:
        pytest.skip("glibc >= 2.33 only")

    memory.trim()
    blocks = [np.ones(12_000) for _ in range(4_000)]  # ~96 KB each: below the mmap threshold, from the heap
    keep = blocks[-1]
    del blocks  # ~380 MB free inside the heap, kept there by the live block at its top
    free = memory._libc.mallinfo2().fordblks
    assert free > max(300 << 20, memory.TASK_TRIM_BYTES)
    before = memory.rss()
    memory.trim(free + (1 << 30))  # not enough free memory for this threshold: nothing given back
    assert memory.rss() > before - (32 << 20)
    memory.trim(memory.TASK_TRIM_BYTES)
    assert memory.rss() < before - (256 << 20)
    del keep


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_run_directories_of_dead_processes_are_removed(tmp_path):
    """``tempdirs.remove_stale``: a run directory (spill, session, data, workers) whose process no longer runs is
    removed; one of a live process, one without a pid in its name, another name and a plain file are left alone."""
    import os

    from llc_onnx import tempdirs

    dead = [tmp_path / f"llc-{kind}-{_dead_pid()}-abc" for kind in tempdirs.KINDS]
    live = tmp_path / f"llc-spill-{os.getpid()}-def"
    old_style = tmp_path / "llc-spill-6ztqcp6p"
    other = tmp_path / f"llc-cache-{_dead_pid()}-x"  # not a kind of run directory
    for d in (*dead, live, old_style, other):
        d.mkdir()
        (d / "0.npy").write_bytes(b"x" * 100)
    not_dir = tmp_path / f"llc-spill-{_dead_pid()}-file"
    not_dir.write_text("x")
    assert sorted(tempdirs.remove_stale(str(tmp_path))) == sorted(map(str, dead))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, old_style.name, other.name,
                                                                  not_dir.name])


_SPILL_CHILD = """
import pathlib, sys, time
import numpy as np
from llc_onnx import memory
s = memory.Spill()
s.put(np.zeros(1000, np.float32))
pathlib.Path(sys.argv[1]).write_text(s.dir)
time.sleep(60)
"""


def test_a_killed_process_spill_is_removed_by_the_next_run(tmp_path):
    """SIGKILL (no handler can run) leaves a real process's spill directory behind; the next process's first spill
    removes it, and its own directory is gone when that spill is."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    mark = tmp_path / "dir"
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-c", _SPILL_CHILD, str(mark)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    left = mark.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(left) and os.path.dirname(left) == str(tmp)
    code = ("from llc_onnx import memory; s = memory.Spill(); import os; "
            "assert os.listdir(os.environ['TMPDIR']) == [os.path.basename(s.dir)]; d = s.dir; del s; "
            "import gc; gc.collect(); assert not os.path.exists(d)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert list(tmp.iterdir()) == []
