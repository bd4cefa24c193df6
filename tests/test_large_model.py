"""A synthetic model above 2 GB end to end (``bench/large_model.py``): out of CI — it needs ~3x the model size in
memory and minutes. By hand: ``python -m pytest -m large tests/test_large_model.py`` (or the bench script itself,
whose figures are in bench/fuzz.md). CI runs the scaled-down pair checks of ``test_model_pair.py``."""

from __future__ import annotations

import json
import os
import re

import pytest

pytestmark = pytest.mark.large


def test_model_above_2gb_end_to_end(tmp_path):
    from bench.large_model import main

    rc = main(["--dir", str(tmp_path), "--size-gb", "2.15"])
    if rc == 2:
        pytest.skip("not enough free memory for the > 2 GB model")
    r = json.load(open(tmp_path / "results.json"))
    assert rc == 0, r
    assert r["model_bytes"] > 2**31  # really above protobuf's limit
    assert r["optimize"]["rc"] == 0 and r["inspect output"]["rc"] == 0 and r["compare"]["rc"] in (0, 1)
    nodes = {n["node"]: n["level"] for n in r["optimize"]["json"]["stages"][0]["nodes"]}
    assert set(nodes) == {"fc0", "head"}  # --nodes: only those
    files = r["output_files"]
    assert "model.llc.onnx" in files and any(re.fullmatch(r"model\.llc\.onnx\.[0-9a-f]{16}\.data", f) for f in files)
    for i in r["interrupted"]:
        assert i["hit_during_write"] and i["pair_unchanged"], i
        if i["signal"] == "SIGTERM":
            assert i["rc"] == 143 and i["leftovers"] == [], i
    assert os.path.getsize(tmp_path / "out" / "model.llc.onnx") < 64 << 20  # the weights are in the data file
