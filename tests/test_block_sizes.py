"""Several block sizes per run (``--block-size 32,128``): every 2/4-bit level is offered once per block size
and the knapsack picks one per node; what is written is the chosen block, and its bytes are what the report says.
"""

import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from llc_onnx.compressible import find_compressible
from llc_onnx.config import ConfigError, QuantConfig, from_dict, to_toml
from llc_onnx.targets import get_target
from llc_onnx.targets.ort_cpu import TWO_BIT_BLOCK16

from test_optimize import EX_DATA, EX_MODEL, one_json, run_cli

EX = Path(__file__).resolve().parents[1] / "examples"


def test_config_block_sizes_normalised_and_checked():
    assert QuantConfig(block_size=32).block_size == 32
    assert QuantConfig(block_size=(128, 32, 32)).block_size == (32, 128)
    assert QuantConfig(block_size=[64]).block_size == 64              # a TOML list of one is the plain size
    cfg = from_dict({"quant": {"block_size": [128, 32]}})
    assert from_dict(tomllib.loads(to_toml(cfg))).quant.block_size == (32, 128)   # a config file round-trips
    for bad in (0, (32, 0), (), "32", True):
        with pytest.raises(ConfigError, match="quant.block_size"):
            QuantConfig(block_size=bad)


def test_offers_union_over_block_sizes_with_refusals_named_by_block():
    model = onnx.load(EX / "fashion_cnn.onnx")
    nodes, _ = find_compressible(model)
    t = get_target("ort-cpu")
    both = t.offers(model, nodes, levels=(2, 4, 8, "float"), block_size=(16, 32))
    fc = both["/fc1/Gemm"]
    assert fc.names() == ["float", "mnb-int4-b16-acc4", "w8a8-int8c7-auint8", "mnb-int8-b16-acc4",
                          "mnb-int2-b32-acc4", "mnb-int4-b32-acc4", "mnb-int8-b32-acc4"]
    # 2-bit is refused at block 16 only: the refusal names the block, and int2 is still offered at 32
    assert fc.refused == (("int2 b16", TWO_BIT_BLOCK16),)
    # a refusal true at every block size (low-bit Conv) appears once, as for one block size
    conv = both["/conv1/Conv"]
    single = t.offers(model, nodes, levels=(2, 4, 8, "float"), block_size=32)["/conv1/Conv"]
    assert conv == single
    # bytes: the larger block stores fewer scales
    fmts = {f.name: f for f in fc.formats}
    node = next(n for n in nodes if n.name == "/fc1/Gemm")
    assert fmts["mnb-int4-b16-acc4"].nbytes(node) > fmts["mnb-int4-b32-acc4"].nbytes(node)


def test_optimize_mixes_block_sizes_and_writes_the_chosen_block(tmp_path):
    out = tmp_path / "mixed.onnx"
    rc, stdout, _ = run_cli(["optimize", EX_MODEL, "--data", EX_DATA, "--block-size", "16,32", "--bits", "4,8,float",
                             "--budget", "0.3", "-o", str(out), "--json", "--seed", "0"])
    assert rc == 0
    res = one_json(stdout)
    assert res["config"]["quant"]["block_size"] == [16, 32]
    chosen = {n["node"]: n["level"] for n in res["nodes"]}
    model = onnx.load(str(out))
    written = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            written[node.name] = (a["bits"], a["block_size"])
    blocked = {n: lv for n, lv in chosen.items() if lv.startswith("mnb-")}
    assert blocked, chosen
    for name, level in blocked.items():
        bits, block = next(v for k, v in written.items() if k.startswith(name) or name in k)
        assert level.startswith(f"mnb-int{bits}-b{block}-"), (name, level, bits, block)
    # the report's bytes are the written weights' bytes (codes + scales of the chosen block)
    size = sum(int(np.prod(t.dims)) * (4 if t.data_type == onnx.TensorProto.FLOAT else 1)
               for t in model.graph.initializer
               if any(t.name in n.input[1:3] for n in model.graph.node if n.op_type == "MatMulNBits"))
    assert size == sum(n["bytes"] for n in res["nodes"] if n["level"].startswith("mnb-"))
