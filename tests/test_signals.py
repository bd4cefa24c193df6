"""SIGINT / SIGTERM during ``optimize`` leave no output and no temporary file: the signal is raised as an
exception where the program is (``cli.Interrupted``), so the atomic writers clean up. Points: while measuring,
during the verdict, while the model is written (one file, and a model with external data), while the report is
written; and a real signal from outside to a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from _models import torch_threads, write_mlp_files
from llc_onnx import model_io
from llc_onnx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _files(d) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, ds, fs in os.walk(d) for f in fs + ds)


def _kill_self_in(monkeypatch, module, name, sig, after=0):
    """Replace ``module.name`` by a wrapper that sends ``sig`` to this process on its call number ``after``
    (0 = first), before (or, for the writers, after) running the original."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] - 1 == after:
            out = real(*args, **kwargs) if name in ("_write_file", "write_bytes_atomic") else None
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler raises here at the latest
            return out
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


POINTS = {
    "measuring": ("llc_onnx.flows.quantize", "build_candidates", 0, False),
    "verdict": ("llc_onnx.verify", "verdict", 0, False),
    "writing the model": ("llc_onnx.model_io", "_write_serialized", 0, False),  # a single-file model, streamed
    "writing data + model": ("llc_onnx.model_io", "_write_file", 0, True),
    "writing the report": ("llc_onnx.report_files", "write_bytes_atomic", 2, False),
}


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_optimize_leaves_nothing(point, sig, tmp_path, monkeypatch, capsys):
    import importlib

    model, data = write_mlp_files(tmp_path, n=160)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mod, name, after, external = POINTS[point]
    if external:
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    _kill_self_in(monkeypatch, importlib.import_module(mod), name, sig, after)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    rc = main(["optimize", model, "--data", data, "-o", str(out_dir / "o.onnx"), "--report", str(out_dir / "rep"),
               "--allow-loss-increase", "--json"])
    err = capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert rc == 128 + sig, err
    if point == "writing the report":  # the model was committed before: say so; the report is all or nothing
        assert _files(out_dir) == ["o.onnx"] and f"after {out_dir / 'o.onnx'} was written" in err
    else:
        assert _files(out_dir) == [] and "nothing was written" in err
    assert err.count("\n") == 1 and err.startswith(f"error: interrupted ({signal.Signals(sig).name})")


_CHILD = """
import pathlib, sys, time, importlib
mod, name, mark = sys.argv[1:4]
module = importlib.import_module(mod)
real = getattr(module, name)
def reached(*args, **kwargs):  # tell the parent where the run is, then give it time to send the signal
    pathlib.Path(mark).write_text(name)
    time.sleep(60)
    return real(*args, **kwargs)
setattr(module, name, reached)
from llc_onnx.cli import main
raise SystemExit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("sig, point", [(signal.SIGTERM, "measuring"), (signal.SIGINT, "verdict")])
def test_real_signal_to_a_real_process(sig, point, tmp_path):
    """SIGTERM / SIGINT sent from outside to a real ``llc-onnx optimize`` process once it is measuring / giving
    the verdict (the child writes a marker file there and waits): exit 143 / 130 with one line on stderr,
    nothing left in the output directory. The signal handling is the real one; only the point is pinned, so the
    test does not depend on how fast the machine is."""
    model, data = write_mlp_files(tmp_path, n=400)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mark = tmp_path / "reached"
    mod, name, _, _ = POINTS[point]
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mod, name, str(mark), "optimize", model, "--data", data,
                             "-o", str(out_dir / "o.onnx"), "--report", str(out_dir / "rep")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not mark.exists():
        time.sleep(0.02)
    assert mark.exists(), f"the run never reached {name} (exit {proc.poll()})"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"error: interrupted ({signal.Signals(sig).name}); nothing was written"], err
    assert _files(out_dir) == []


_SPILL_CHILD = """
import pathlib, sys, time
from llc_onnx import memory
from llc_onnx.flows import context
context.SPILL_BYTES = 0  # spill the gradient pass to files, as a large model does
real = memory.Spill.put
def put(self, arr, *args, **kwargs):  # tell the parent a spill directory exists, then give it time to send the signal
    out = real(self, arr, *args, **kwargs)
    tmp = pathlib.Path(sys.argv[1] + ".tmp")
    tmp.write_text(self.dir)
    tmp.rename(sys.argv[1])  # (whole: the parent reads it as soon as it exists)
    time.sleep(60)
    return out
memory.Spill.put = put
real_zeros = memory.Spill.zeros
def zeros(self, *args, **kwargs):  # (accumulators in files: the gradient and Gram passes of a large model)
    out = real_zeros(self, *args, **kwargs)
    tmp = pathlib.Path(sys.argv[1] + ".tmp")
    tmp.write_text(self.dir)
    tmp.rename(sys.argv[1])
    time.sleep(60)
    return out
memory.Spill.zeros = zeros
from llc_onnx.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_spilling_leaves_no_temporary_file(sig, tmp_path):
    """A real process that has spilled its gradient pass to ``$TMPDIR`` (``memory.Spill``) and gets SIGTERM /
    SIGINT there: exit 128 + signal, one line, and neither the output directory nor ``$TMPDIR`` keeps a file."""
    model, data = write_mlp_files(tmp_path, n=400)
    out_dir, tmp = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp.mkdir()
    mark = tmp_path / "spilled"
    proc = subprocess.Popen([sys.executable, "-c", _SPILL_CHILD, str(mark), "optimize", model, "--data", data,
                             "-o", str(out_dir / "o.onnx")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TMPDIR": str(tmp)})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not mark.exists():
        time.sleep(0.02)
    assert mark.exists(), f"the run never spilled (exit {proc.poll()}): {proc.stderr.read().decode()[-2000:]}"
    assert os.path.isdir(mark.read_text())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines() == [f"error: interrupted ({signal.Signals(sig).name}); nothing was written"]
    # ONNX Runtime keeps a session-id file of its own in $TMPDIR (`.ses`, written by every session, kept across runs)
    assert _files(out_dir) == [] and [f for f in _files(tmp) if f != ".ses"] == []
