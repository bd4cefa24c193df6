"""Ahead-of-time compile of every kernel function to PTX/cubin for sm_80 and sm_90 on this CPU machine.

Runs ``python -m llc_onnx.plugins.triton.aot`` in a subprocess without TRITON_INTERPRET (the interpreter mode
is process-wide): every kernel (GEMV, GEMM small-M and large-M defaults, split-K reduction) in its heaviest
register case; ``ptxas -v`` (Triton's bundled one) must report no spills, no Triton scratch memory (the
TensorRT AOT launch passes none) and shared memory within the architecture's limit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -c constraints.txt triton; it is in "
                                       "the 'test' extra)")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(out / "cache"))
    r = subprocess.run([sys.executable, "-m", "llc_onnx.plugins.triton.aot", "--arch", "80", "90", "--out",
                        str(out / "ptx")], env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return r, rows, out / "ptx"


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(compiled):
    r, rows, _ = compiled
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    table = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    kinds = {(t[0], t[5]) for t in table}
    assert kinds == {(k, a) for k in ("gemv", "gemm", "reduce") for a in ("sm_80", "sm_90")}
    for t in table:
        regs, spills, shared, scratch = int(t[6]), t[7], int(t[8]), int(t[9])
        assert spills == "0/0", f"{t}: register spills"
        assert 0 < regs <= 255 and scratch == 0
        assert shared <= (163 if t[5] == "sm_80" else 227) * 1024


def test_the_ptx_is_what_a_tensorrt_aot_launch_expects(compiled):
    _, _, ptx_dir = compiled
    files = sorted(os.listdir(ptx_dir))
    assert files
    for name in files:
        text = open(ptx_dir / name).read()
        arch = re.search(r"_sm(\d+)_", name).group(1)
        assert re.search(rf"^\.target sm_{arch}a?$", text, re.M), name
        entry = re.search(r"\.visible \.entry (\w+)\(([^)]*)\)", text, re.S)
        assert entry, name
        params = re.findall(r"\.param \.(\w+) ", entry.group(2))
        # x, w, s (pointers), M, N, K (int32), y (pointer), then Triton's two hidden scratch pointers
        if "wo_" in entry.group(1):
            assert params[:7] == ["u64", "u64", "u64", "u32", "u32", "u32", "u64"], (name, params)
            assert len(params) <= 9
