"""Measurement snapshots: a hooked run resumed from the unhooked run's live values gives the same result, bit for
bit, as a full run, and really skips the prefix."""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from _models import cnn, make, mlp, ort_logits, save_npz, shared, teacher_labels, torch_threads
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.calib.noise import measure, measure_base
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph

F = TensorProto.FLOAT


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def residual(seed=0, d=8, classes=3):
    """x -> MatMul(A) 'a' -> Relu -> MatMul(B) 'b' -> Add(x) -> MatMul(C) 'c' -> logits: a skip connection, so
    the value live before 'b' includes x."""
    rng = np.random.default_rng(seed)
    w = {k: (rng.normal(size=s) / np.sqrt(d)).astype(np.float32)
         for k, s in (("A", (d, d)), ("B", (d, d)), ("C", (d, classes)))}
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="a"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "B"], ["g"], name="b"),
             helper.make_node("Add", ["g", "x"], ["s"], name="skip"),
             helper.make_node("MatMul", ["s", "C"], ["logits"], name="c")]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", d])],
             [helper.make_tensor_value_info("logits", F, ["N", classes])], w)
    return m, w


MODELS = {"mlp": (mlp, (5, 8), ["fc1", "fc2"]), "cnn": (cnn, (5, 1, 6, 6), ["conv", "fc"]),
          "shared": (shared, (5, 6), ["mm1", "mm2", "out"]), "residual": (residual, (5, 8), ["a", "b", "c"])}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resumed_runs_equal_full_runs(name):
    build, shape, nodes = MODELS[name]
    model, _ = build()
    g = TorchGraph(model)
    x = {"x": np.random.default_rng(3).normal(size=shape).astype(np.float32)}
    out, snaps = g.snapshot(x, nodes, outputs=["logits"])
    assert torch.equal(out["logits"], g.run(x, outputs=["logits"])[0]["logits"])
    assert len(snaps.positions) == len(nodes) - 1  # none before the first node: that is an ordinary run
    for k in nodes:
        for hooks in ({"weight_fns": {k: lambda w: w * 1.01}},
                      {"input_fns": {k: lambda v: v + 0.05}},
                      {"weight_fns": {k: lambda w: w * 0.9, nodes[-1]: lambda w: -w}}):
            full = g.run(x, outputs=["logits"], **hooks)[0]["logits"]
            resumed = g.run(x, outputs=["logits"], resume=snaps, **hooks)[0]["logits"]
            assert torch.equal(full, resumed), (k, hooks)
            assert not torch.equal(full, out["logits"])  # the hook did change something


def test_resume_skips_the_prefix(monkeypatch):
    model, _ = residual()
    g = TorchGraph(model)
    x = {"x": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)}
    _, snaps = g.snapshot(x, ["a", "b", "c"], outputs=["logits"])
    calls = []
    for node in g._nodes:  # count the MatMul nodes that run
        if node.op == "MatMul":
            monkeypatch.setattr(node, "fn", lambda ctx, xs, real=node.fn: calls.append(ctx.node.key) or real(ctx, xs))
    g.run(x, outputs=["logits"], weight_fns={"c": lambda w: w * 2}, resume=snaps)
    assert calls == ["c"]
    calls.clear()
    g.run(x, outputs=["logits"], weight_fns={"b": lambda w: w * 2, "c": lambda w: w}, resume=snaps)
    assert calls == ["b", "c"]
    calls.clear()
    g.run(x, outputs=["logits"], weight_fns={"c": lambda w: w * 2})
    assert calls == ["a", "b", "c"]


def test_thinned_snapshots_fit_the_byte_limit_and_stay_exact():
    model, _ = residual(d=32)
    g = TorchGraph(model)
    x = {"x": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)}
    _, full = g.snapshot(x, ["a", "b", "c"], outputs=["logits"])
    _, thin = g.snapshot(x, ["a", "b", "c"], outputs=["logits"], max_bytes=full.nbytes() - 1)
    assert len(thin.positions) < len(full.positions) and thin.nbytes() < full.nbytes()
    _, none = g.snapshot(x, ["a", "b", "c"], outputs=["logits"], max_bytes=0)
    assert none.positions == [] and none.before(10) == (0, {})
    hook = {"c": lambda w: w * 3}
    ref = g.run(x, outputs=["logits"], weight_fns=hook)[0]["logits"]
    for s in (full, thin, none):
        assert torch.equal(g.run(x, outputs=["logits"], weight_fns=hook, resume=s)[0]["logits"], ref)


def test_snapshots_belong_to_one_batch_and_an_uncaptured_run():
    model, _ = residual()
    g = TorchGraph(model)
    rng = np.random.default_rng(0)
    x = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    _, snaps = g.snapshot(x, ["a", "b", "c"], outputs=["logits"])
    other = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    with pytest.raises(LLCError, match="input 'x' differs"):
        g.run(other, outputs=["logits"], weight_fns={"c": lambda w: w}, resume=snaps)
    with pytest.raises(LLCError, match="resume: snapshots are for an uncaptured run"):
        g.run(x, outputs=["logits"], capture=["c"], resume=snaps)
    with pytest.raises(LLCError, match="snapshot: node 'zz' is not in the graph"):
        g.snapshot(x, ["zz"], outputs=["logits"])


def test_measure_with_snapshots_gives_identical_samples(tmp_path):
    model, _ = residual()
    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    y = teacher_labels(ort_logits(model, x=x), flip=0.3)
    ds = load_dataset(save_npz(tmp_path / "d.npz", y, x=x), model, batch_size=16)
    loss = make_loss("ce", "logits")
    g = TorchGraph(model)
    base, snaps = measure_base(g, ds, loss, ["a", "b", "c"])
    assert len(snaps) == len(ds.batches)
    np.testing.assert_array_equal(base.sums, measure(g, ds, loss).sums)
    for k in ("a", "b", "c"):
        hook = {k: lambda w: torch.round(w * 8) / 8}
        np.testing.assert_array_equal(measure(g, ds, loss, hook, snapshots=snaps).sums,
                                      measure(g, ds, loss, hook).sums)


def test_dropped_snapshots_keep_what_later_runs_start_from():
    model, _ = residual(d=16)
    g = TorchGraph(model)
    x = {"x": np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)}
    _, snaps = g.snapshot(x, ["a", "b", "c"], outputs=["logits"])
    pb, pc = g.position(["logits"], "b"), g.position(["logits"], "c")
    assert snaps.positions == [pb, pc]  # ('a' is the first node: a run resuming there is an ordinary run)
    hooks = {k: {k: (lambda w: w * 0.5)} for k in ("a", "b", "c")}
    ref = {k: g.run(x, outputs=["logits"], weight_fns=h)[0]["logits"] for k, h in hooks.items()}
    snaps.drop_before(pb)  # nothing before b's snapshot: nothing dropped
    assert snaps.positions == [pb, pc]
    snaps.drop_before(pc)
    assert snaps.positions == [pc] and len(snaps.envs) == 1
    assert snaps.before(pb) == (0, {})  # a run at b now starts from the inputs ...
    for k, h in hooks.items():  # ... and every run still gives the full run's values, bit for bit
        assert torch.equal(g.run(x, outputs=["logits"], weight_fns=h, resume=snaps)[0]["logits"], ref[k])


def test_the_candidate_stage_lets_go_of_passed_snapshots_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """Candidates are measured in node order; the snapshots before the next node are dropped as the stage goes
    (SmolLM2: ~0.9 GB at its start). The costs and the written model are those of a run that keeps them all."""
    import llc_onnx
    from llc_onnx.config import CriterionConfig, DeviceConfig, OptimizeConfig, QuantConfig
    from llc_onnx.flows import context

    m, _ = residual(seed=3, d=32, classes=4)  # three compressible nodes: snapshots before b and c
    x = np.random.default_rng(4).normal(size=(320, 32)).astype(np.float32)
    data = save_npz(tmp_path / "d.npz", teacher_labels(ort_logits(m, x=x), flip=0.2), x=x)
    model = str(tmp_path / "m.onnx")
    import onnx

    onnx.save(m, model)
    cfg = OptimizeConfig(quant=QuantConfig(bits=(2, 4, 8, "float")), device=DeviceConfig(threads=1),
                         criterion=CriterionConfig(allow_loss_increase=True))
    held = []
    real = context.FlowContext.forget_snapshots_before

    def forget(self, name):
        real(self, name)
        held.append(sum(len(s.positions) for s in self._snapshots))

    runs = {}
    for mode in ("keep", "forget"):
        if mode == "keep":
            monkeypatch.setattr(context.FlowContext, "forget_snapshots_before", lambda self, name: None)
        else:
            monkeypatch.setattr(context.FlowContext, "forget_snapshots_before", forget)
        runs[mode] = llc_onnx.optimize(model, data, cfg)
    assert held[0] > held[-1] >= 1 and held == sorted(held, reverse=True), held
    assert runs["forget"].model.SerializeToString() == runs["keep"].model.SerializeToString()
    assert [c.to_dict() for c in runs["forget"].stages[0].candidates] == \
        [c.to_dict() for c in runs["keep"].stages[0].candidates]
