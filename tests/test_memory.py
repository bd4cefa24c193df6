"""``llc_onnx.memory``: spilled gradient passes (files mapped back read-only) give the same run, bit for bit, and
their pages leave the process's memory between tasks."""

import numpy as np

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
