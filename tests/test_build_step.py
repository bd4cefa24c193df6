"""The build integration README describes: a configuration pinned with ``--print-config`` round-trips, and
``examples/build_step.py`` (public API only) writes the same bytes as ``llc-onnx optimize --config``."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llc_onnx
from llc_onnx.cli import main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "build_step.py"
MODEL = REPO / "examples" / "fashion_cnn.onnx"
DATA = REPO / "examples" / "fashion_data.npz"
# settings a build would pin: a byte budget and a tolerance the bundled example verifies within; fewer measured
# samples and no latency measurement keep the test short
PIN = ["--budget", "0.3", "--tolerance", "0.01", "--measure-samples", "200", "--no-latency"]


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    rc, toml, err = _cli(["optimize", MODEL, *PIN, "--print-config"])
    assert rc == 0, err
    cfg = d / "llc.toml"
    cfg.write_text(toml)
    return d, cfg, toml


def test_printed_config_round_trips(pinned):
    d, cfg, toml = pinned
    config = llc_onnx.load_config(str(cfg))                    # TOML -> config
    assert llc_onnx.to_toml(config) == toml                     # config -> the same TOML text
    assert config.quant.budget == 0.3 and config.criterion.tolerance == 0.01
    assert config.data.measure_samples == 200 and config.target.measure_latency is False
    # a config built in Python goes through TOML and back unchanged (tuples with "float", bools, None left out)
    built = llc_onnx.OptimizeConfig(quant=llc_onnx.QuantConfig(bits=(4, 8, "float"), budget=0.25, activations=True),
                                    criterion=llc_onnx.CriterionConfig(margin_z=0.5, allow_loss_increase=True),
                                    target=llc_onnx.TargetConfig(name="qdq"))
    path = d / "built.toml"
    path.write_text(llc_onnx.to_toml(built))
    assert llc_onnx.load_config(str(path)) == built
    # the CLI reads the file back to the same effective configuration (flags override nothing here)
    rc, again, _ = _cli(["optimize", MODEL, "--config", path, "--print-config"])
    assert rc == 0 and again == path.read_text()


def test_build_step_uses_only_the_public_api():
    tree = ast.parse(SCRIPT.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("llc_onnx")} == {"llc_onnx"}
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "llc_onnx"}
    assert used == {"optimize", "OptimizeConfig", "load_config", "LLCError"}
    assert used <= set(llc_onnx.__all__)


def test_build_step_reproduces_the_cli_byte_for_byte(pinned, tmp_path):
    _, cfg, _ = pinned
    before = _sha(MODEL)
    cli_out, script_out, summary = tmp_path / "cli.onnx", tmp_path / "script.onnx", tmp_path / "result.json"
    rc, stdout, err = _cli(["optimize", MODEL, "--data", DATA, "--config", cfg, "-o", cli_out, "--json"])
    assert rc == 0, err
    cli_result = json.loads(stdout)
    assert cli_result["verified"] and cli_result["bytes"]["reduction"] > 0.5   # it really compressed

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(SCRIPT), str(MODEL), str(DATA), str(cfg), "-o", str(script_out),
                        "--summary", str(summary)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("VERIFIED: test loss") and f"written {script_out}" in p.stdout
    assert _sha(script_out) == _sha(cli_out)                     # the same bytes as the CLI
    script_result = json.loads(summary.read_text())
    for key in ("verified", "bytes", "levels", "nodes", "splits", "config"):
        assert script_result[key] == cli_result[key], key
    assert _sha(MODEL) == before                                 # the input model is untouched


def test_build_step_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bad = tmp_path / "bad.toml"
    bad.write_text("[quant]\nbits = [3]\n")
    p = subprocess.run([sys.executable, str(SCRIPT), str(MODEL), str(DATA), str(bad), "-o", str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "quant.bits" in p.stderr and not (tmp_path / "m.onnx").exists()
