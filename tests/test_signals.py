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
    "writing the model": ("llc_onnx.model_io", "_write_file", 0, False),
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


def test_real_signal_to_a_real_process(tmp_path):
    """SIGTERM and SIGINT from outside once the run is under way (by the child's CPU time: its imports take
    ~3 s of CPU, the whole run ~6 s): exit 143 / 130 with one line, nothing left in the output directory."""
    model, data = write_mlp_files(tmp_path, n=2000, d_in=32, hidden=128)
    interrupted = 0
    for sig, cpu in ((signal.SIGTERM, 3.8), (signal.SIGINT, 4.6)):
        out_dir = tmp_path / f"out{int(sig)}"
        out_dir.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "llc_onnx", "optimize", model, "--data", data, "-o",
                                 str(out_dir / "o.onnx"), "--report", str(out_dir / "rep")], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _cpu_seconds(proc.pid) < cpu:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        if proc.returncode in (0, 1):  # finished before the signal: the output is complete
            assert (out_dir / "o.onnx").exists() or proc.returncode == 1
            continue
        assert proc.returncode == 128 + sig, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err
        assert _files(out_dir) == []
        interrupted += 1
    assert interrupted, "both runs finished before the signal"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
