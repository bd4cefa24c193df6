"""``optimize --cache DIR``: measurements reused across runs, byte-identical output, key covers what matters."""

import os

import pytest

from _models import torch_threads, write_mlp_files
from test_optimize import one_json, run_cli


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def tiny(tmp_path):
    return write_mlp_files(tmp_path)


def _opt(model, data, out, *extra):
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(out), "--json",
                                  "--bits", "2,4,8,float", "--allow-loss-increase", *extra])
    assert rc == 0, stderr
    return one_json(stdout)


def _entries(d):
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


def test_hit_reuses_measurements_and_writes_identical_bytes(tiny, tmp_path):
    model, data = tiny
    cache = tmp_path / "cache"
    plain = _opt(model, data, tmp_path / "plain.onnx", "--budget", "0.3")
    first = _opt(model, data, tmp_path / "a.onnx", "--budget", "0.3", "--cache", str(cache))
    assert first["stages"][0]["cache"]["hit"] is False and "gradients" in first["seconds"]
    assert len(_entries(cache)) == 3  # one entry: .json + .npz + .codes, no temporary files left
    second = _opt(model, data, tmp_path / "b.onnx", "--budget", "0.3", "--cache", str(cache))
    assert second["stages"][0]["cache"]["entry"] == first["stages"][0]["cache"]["entry"] and second["stages"][0]["cache"]["hit"] is True
    assert second["stages"][0]["cache"]["seconds"] == first["stages"][0]["cache"]["seconds"] > 0
    assert "gradients" not in second["seconds"] and "candidates" not in second["seconds"]
    # same candidates, same output bytes as without any cache
    assert second["stages"][0]["candidates"] == first["stages"][0]["candidates"] == plain["stages"][0]["candidates"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == \
        (tmp_path / "plain.onnx").read_bytes()

    # a different budget / margin reuses the entry (they only re-solve / re-classify) ...
    other = _opt(model, data, tmp_path / "c.onnx", "--budget", "0.5", "--margin-z", "0", "--cache", str(cache))
    assert other["stages"][0]["cache"]["hit"] is True and len(_entries(cache)) == 3
    uncached = _opt(model, data, tmp_path / "d.onnx", "--budget", "0.5", "--margin-z", "0")
    assert [c["cost"] for c in other["stages"][0]["candidates"]] == [c["cost"] for c in uncached["stages"][0]["candidates"]]
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "d.onnx").read_bytes()

    # ... while anything a candidate depends on makes a new entry
    from llc_onnx.targets.ort_cpu import int8_full_range_exact

    extras = [["--bits", "4,8,float"], ["--seed", "1"], ["--llc-radius", "0.01"], ["--block-size", "16"]]
    if int8_full_range_exact() is None:  # full-range W8A8 codes are refused on CPUs whose int8 kernels saturate
        extras.append(["--w8a8-codes", "8"])
    for extra in extras:
        r = _opt(model, data, tmp_path / "e.onnx", "--cache", str(cache), *extra)
        assert r["stages"][0]["cache"]["hit"] is False, extra
    assert len(_entries(cache)) == 3 * (1 + len(extras))


def test_damaged_entry_is_reported_and_recomputed(tiny, tmp_path):
    model, data = tiny
    cache = tmp_path / "cache"
    first = _opt(model, data, tmp_path / "a.onnx", "--cache", str(cache))
    with open(first["stages"][0]["cache"]["entry"], "w") as f:
        f.write("{not json")
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "b.onnx"), "--json",
                                  "--bits", "2,4,8,float", "--allow-loss-increase", "--cache", str(cache)])
    assert rc == 0
    r = one_json(stdout)
    assert r["stages"][0]["cache"]["hit"] is False
    assert "warning: cache entry" in stderr and first["stages"][0]["cache"]["entry"] in stderr and "delete it" in stderr
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the rewritten entry is good again
    assert _opt(model, data, tmp_path / "c.onnx", "--cache", str(cache))["stages"][0]["cache"]["hit"] is True


def test_unwritable_cache_directory_is_a_one_line_error(tiny, tmp_path):
    model, data = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = tmp_path / "o.onnx"
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(out), "--cache",
                                  str(blocker / "sub")])
    assert rc == 2 and not out.exists()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --cache") and "writable" in lines[0], stderr


def test_cache_entries_and_reports_have_ordinary_permissions(tiny, tmp_path):
    """Atomic writes go through mkstemp (owner-only); the files must end up like any file the user writes."""
    model, data = tiny
    old = os.umask(0o022)
    try:
        r = _opt(model, data, tmp_path / "a.onnx", "--cache", str(tmp_path / "cache"), "--report",
                 str(tmp_path / "rep"))
    finally:
        os.umask(old)
    files = [r["stages"][0]["cache"]["entry"], r["stages"][0]["cache"]["entry"][:-5] + ".npz"] + \
        [str(p) for p in (tmp_path / "rep").iterdir()]
    assert len(files) > 4
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o644, f


def test_a_large_models_hit_reads_its_gradients_into_files(tiny, tmp_path, monkeypatch):
    """A large model's cache hit (forced here with ``SPILL_BYTES = 0``) puts each stored gradient in a file mapped
    back read-only as it reads it (not all of them in memory), and writes the bytes of the ordinary hit."""
    import numpy as np

    from llc_onnx.flows import context as C
    from llc_onnx.flows import cost_cache

    model, data = tiny
    cache = tmp_path / "cache"
    _opt(model, data, tmp_path / "a.onnx", "--budget", "0.3", "--cache", str(cache))
    ordinary = _opt(model, data, tmp_path / "b.onnx", "--budget", "0.3", "--cache", str(cache))
    monkeypatch.setattr(C, "SPILL_BYTES", 0)
    loaded = []
    orig = cost_cache.load

    def load(*args, **kwargs):
        hit = orig(*args, **kwargs)
        loaded.append([isinstance(s.grad_w, np.memmap) for s in hit.grads.nodes.values()])
        return hit
    monkeypatch.setattr(cost_cache, "load", load)
    spilled = _opt(model, data, tmp_path / "c.onnx", "--budget", "0.3", "--cache", str(cache))
    assert loaded and loaded[0] and all(loaded[0])
    assert spilled["stages"][0]["cache"]["hit"] is True
    assert spilled["stages"][0]["candidates"] == ordinary["stages"][0]["candidates"]
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_hit_reads_the_kept_codes_and_rounds_nothing(tiny, tmp_path, monkeypatch):
    """The candidate stage keeps every rounded weight beside the entry (``flows.code_store``); a hit builds its
    plans from them — no rounding and no Gram pass — and writes the bytes of the run that rounded them. A damaged
    pair is reported and rounded again (same bytes); ``--no-cache-codes`` keeps none."""
    from llc_onnx.calib import gram
    from llc_onnx.flows import roundings

    model, data = tiny
    cache = tmp_path / "cache"
    first = _opt(model, data, tmp_path / "a.onnx", "--budget", "0.3", "--cache", str(cache))
    codes = cache / next(e for e in _entries(cache) if e.endswith(".codes"))
    kept = _entries(codes)
    measured = [c for c in first["stages"][0]["candidates"] if not c["reference"]]
    assert len([f for f in kept if f.endswith(".npz")]) >= len(measured) > 0
    assert len([f for f in kept if f.endswith(".q.npy")]) == len([f for f in kept if f.endswith(".npz")])

    def rounded_again(*args, **kwargs):
        raise AssertionError("rounded again on a hit")
    with monkeypatch.context() as m:
        m.setattr(roundings.Rounder, "_round", rounded_again)
        m.setattr(gram, "collect_grams", rounded_again)
        second = _opt(model, data, tmp_path / "b.onnx", "--budget", "0.3", "--cache", str(cache))
    assert second["stages"][0]["cache"]["hit"] is True and "gram" not in second["seconds"]
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()

    for f in kept:  # every record damaged: each one read is reported and rounded (and kept) again
        if f.endswith(".npz"):
            (codes / f).write_bytes(b"not an npz")
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "c.onnx"), "--json",
                                  "--bits", "2,4,8,float", "--allow-loss-increase", "--budget", "0.3",
                                  "--cache", str(cache)])
    assert rc == 0 and "rounded codes" in stderr and "rounding again" in stderr
    assert (tmp_path / "c.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(roundings.Rounder, "_round", rounded_again)
        _opt(model, data, tmp_path / "d.onnx", "--budget", "0.3", "--cache", str(cache))  # rewritten: read again

    other = tmp_path / "other"
    _opt(model, data, tmp_path / "e.onnx", "--budget", "0.3", "--cache", str(other), "--no-cache-codes")
    assert not [e for e in _entries(other) if e.endswith(".codes")]
    assert (tmp_path / "e.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_a_full_disk_costs_the_cache_not_the_run(tiny, tmp_path, monkeypatch):
    """Codes that cannot be written (a write fails, or it would leave less free disk than the entry still needs)
    are reported once and no more are tried; an entry that cannot be written is reported; either way the run
    finishes and writes the bytes of a run without a cache."""
    import collections

    from llc_onnx.flows import code_store, cost_cache

    model, data = tiny
    args = ["optimize", model, "--data", data, "--json", "--bits", "2,4,8,float", "--allow-loss-increase",
            "--budget", "0.3"]
    rc, stdout, _ = run_cli(args + ["-o", str(tmp_path / "plain.onnx")])
    assert rc == 0
    calls = []

    def failing(path, write):
        calls.append(path)
        raise OSError(28, "No space left on device")
    usage = collections.namedtuple("usage", "total used free")
    for name, fake in (("write_atomic", failing), ("disk_usage", lambda d: usage(1 << 30, 1 << 30, 1 << 20))):
        calls.clear()
        cache = tmp_path / f"cache_{name}"
        with monkeypatch.context() as m:
            m.setattr(code_store if name == "write_atomic" else code_store.shutil, name, fake)
            rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / f"{name}.onnx"), "--cache", str(cache)])
        assert rc == 0 and stderr.count("rounded codes not kept") == 1, name
        assert len(calls) == (name == "write_atomic"), name
        assert not [f for d in cache.glob("*.codes") for f in os.listdir(d) if f.endswith(".npz")], name
        assert (tmp_path / f"{name}.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(cost_cache, "write_atomic", failing)
        rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / "noentry.onnx"), "--cache", str(tmp_path / "c3")])
    assert rc == 0 and "cache entry for" in stderr and "not written" in stderr
    assert one_json(stdout)["stages"][0]["cache"]["entry"] is None
    assert (tmp_path / "noentry.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()


def test_a_single_process_with_rank_set_is_rank_0(tiny, tmp_path, monkeypatch):
    """A plain run whose environment says RANK=1 (a launcher that sets only that) is not a worker: it validates,
    tests and writes."""
    model, data = tiny
    monkeypatch.setenv("RANK", "1")
    r = _opt(model, data, tmp_path / "a.onnx", "--budget", "0.3")
    assert r["stages"] and (tmp_path / "a.onnx").is_file()


def test_the_key_holds_the_w8a8_code_bits_on_any_cpu():
    """Full-range W8A8 codes (``--w8a8-codes 8``) change every W8A8 candidate, so they are in the cache key; the
    default (7) leaves the keys of earlier runs as they were. Checked on the key itself, because optimize refuses
    8-bit codes on CPUs whose int8 kernels saturate (the end-to-end loop above runs them only where exact)."""
    from types import SimpleNamespace

    from llc_onnx.config import OptimizeConfig, TargetConfig
    from llc_onnx.flows.quantize import candidate_settings

    def key(**target):
        cfg = OptimizeConfig(target=TargetConfig(**target))
        return candidate_settings(SimpleNamespace(config=cfg, nodes=[], target=SimpleNamespace()))

    assert "w8a8_codes" not in key() and key(w8a8_codes=8)["w8a8_codes"] == 8
    assert {k: v for k, v in key(w8a8_codes=8).items() if k != "w8a8_codes"} == key()
