"""flows.roundings.choose_per_level: which rounding ``--rounding auto`` keeps per level outside the neighbourhood."""

from llc_onnx.flows.roundings import after_probes, choose_per_level, probe_split
from llc_onnx.solvers.cost_model import Candidate


def _rounded(node, rounding, measured, se):
    return Candidate(node, "int4", 10, 0.0, measured, 0.1, False, measured, rounding=rounding, se=se)


def test_auto_rounding_keeps_the_prior_unless_another_wins_by_two_standard_errors():
    """flows.roundings.choose_per_level: GPTQ (the prior) stays when nearest rounding's summed ΔL is lower only
    within noise, nearest replaces it when lower by more than 2 SE of the difference, and without standard
    errors (CET predictions) the lower sum wins."""
    def chosen(pairs):
        cands = [c for i, (g, n) in enumerate(pairs) for c in (_rounded(f"n{i}", "nearest", *n),
                                                             _rounded(f"n{i}", "gptq", *g))]
        kept, info = choose_per_level(cands, ("nearest", "gptq"))
        assert {c.rounding for c in kept} == {info["int4"]["chosen"]} and len(kept) == len(pairs)
        return info["int4"]["chosen"]

    # MiniLM's int4 sums on its task loss: nearest lower by 0.8 SE of the difference
    assert chosen([((0.0062, 0.0053), (-0.0024, 0.0094))]) == "gptq"
    assert chosen([((0.05, 0.01), (0.01, 0.01))]) == "nearest"          # 0.04 > 2·√2·0.01
    assert chosen([((0.03, 0.01), (0.01, 0.01))]) == "gptq"             # 0.02 < 2·√2·0.01
    assert chosen([((0.02, 0.0), (0.01, 0.0))]) == "nearest"            # no SE: the lower sum
    assert chosen([((0.01, 0.0), (0.02, 0.0))]) == "gptq"


# ------------------------------------------------------------------------------------------- probing
class _Named:
    def __init__(self, name):
        self.name = name


def _tasks(spec):
    """(node, format, rounding) tasks from {node: {level: [roundings]}}, in node order."""
    return [(_Named(n), _Named(lv), r) for n, levels in spec.items() for lv, rs in levels.items() for r in rs]


def test_probe_split_spreads_the_probes_and_leaves_small_levels_whole():
    """flows.roundings.probe_split: a level with more than N nodes measured in several roundings is probed at
    ⌊(i + ½)·n/N⌋ of them (every task of a probe node at that level first), the rest later; single-rounding
    tasks (inside the neighbourhood, float) are never probes; no level above N: nothing is split."""
    spec = {f"n{i}": {"float": [""], "int4": ["nearest", "gptq"], "int8": ["llc"] if i % 2 else ["nearest", "gptq"]}
            for i in range(10)}
    tasks = _tasks(spec)
    probe, rest = probe_split(tasks, 4)
    probed = {(tasks[i][0].name, tasks[i][1].name) for i in probe}
    # int4: 10 nodes, probes among the first 9 -> positions 1, 3, 5, 7; int8: the 5 even nodes n0..n8 -> the
    # first 4 of them; a level's last node is never a probe
    assert probed == {(f"n{i}", "int4") for i in (1, 3, 5, 7)} | {(f"n{i}", "int8") for i in (0, 2, 4, 6)}
    assert sorted(probe + rest) == list(range(len(tasks))) and not set(probe) & set(rest)
    assert all(tasks[i][2] in ("nearest", "gptq") for i in probe) and len(probe) == 16
    assert probe_split(tasks, 10) == (list(range(len(tasks))), [])  # no level has more than 10 such nodes
    assert probe_split(tasks, 0) == (list(range(len(tasks))), [])   # 0: every rounding on every node
    # after the probes: int4's other nodes in the chosen rounding only; int8, where nothing was chosen, whole;
    # single-rounding tasks (float, llc) as they are
    kept = [tasks[i] for i in after_probes(tasks, rest, {"int4": "gptq"})]
    assert {r for n, f, r in kept if f.name == "int4"} == {"gptq"}
    assert len([t for t in kept if t[1].name == "int4"]) == 6
    assert len([t for t in kept if t[1].name == "int8"]) == 5 + 2  # the odd nodes' llc, n8's two roundings
    assert len([t for t in kept if t[1].name == "float"]) == 10
    one = probe_split(tasks, 1)[0]
    assert {(tasks[i][0].name, tasks[i][1].name) for i in one} == {("n4", "int4"), ("n4", "int8")}


def test_probing_measures_the_chosen_rounding_only_off_the_probes(tmp_path, monkeypatch):
    """``--rounding-probe 1`` on the two-node MLP at 2 and 4 bits (both nodes outside the neighbourhood): each
    level's choice rests on one probe node (fc1: the last node is never a probe), fc2 is measured in the chosen
    rounding only, and
    every kept candidate — and so the plan and the written bytes — equals the run that measures every rounding
    on every node, where the two runs choose alike."""
    import llc_onnx
    from _models import torch_threads, write_mlp_files
    from llc_onnx.config import CriterionConfig, DeviceConfig, OptimizeConfig, QuantConfig

    from llc_onnx.flows import quantize

    measured = {0: [], 1: []}
    real = quantize.measure_candidate
    model, data = write_mlp_files(tmp_path, n=600, hidden=48)
    runs = {}
    with torch_threads(1):
        for probe in (0, 1):
            cfg = OptimizeConfig(quant=QuantConfig(bits=(2, 4, "float"), budget=0.3, rounding_probe=probe),
                                 device=DeviceConfig(threads=1), criterion=CriterionConfig(allow_loss_increase=True))
            out = tmp_path / f"p{probe}.onnx"
            def recorded(*args, _p=probe):  # every candidate measured, as measured
                cand = real(*args)
                measured[_p].append(cand)
                return cand

            monkeypatch.setattr(quantize, "measure_candidate", recorded)
            res = llc_onnx.optimize(model, data, cfg, out=str(out))
            runs[probe] = (out.read_bytes(), res.stages[0])
    per_level = {p: runs[p][1].settings["rounding_per_level"] for p in runs}
    assert set(per_level[0]) == set(per_level[1]) and len(per_level[1]) == 2, per_level
    for lv, info in per_level[1].items():
        assert info["nodes"] == 1 and per_level[0][lv]["nodes"] == 2
        assert info["chosen"] == per_level[0][lv]["chosen"]  # this data: the same choice from one node as from two
        # the probe's sums are fc1's measurements alone: the same numbers as the full run's fc1 candidates
        fc1 = {c.rounding: c.measured for c in measured[0] if c.node == "fc1" and c.level == lv}
        assert info["sums"] == fc1 and set(fc1) == set(per_level[0][lv]["sums"])
        # off the probe: fc2 measured once at this level (the chosen rounding), in the full run once per rounding
        assert [c.rounding for c in measured[1] if c.node == "fc2" and c.level == lv] == [info["chosen"]]
        assert len([c for c in measured[0] if c.node == "fc2" and c.level == lv]) == 2
    cands = {p: sorted((c.node, c.level, c.rounding, c.measured) for c in runs[p][1].candidates) for p in runs}
    assert cands[0] == cands[1] and len(cands[1]) >= 6
    assert runs[0][0] == runs[1][0]


def test_inside_skips_the_mse_search_only_where_its_answer_is_the_searchs(monkeypatch):
    """Rounder.inside with ``mse`` scales decides from min-max rounding first when that is already inside: the
    answer equals the full search's on weights whose MSE error sits just inside, just outside and far from the
    radius and the shortcut's own threshold (2, 4 and 8 bits; per channel and blocked, with a padded last block;
    a MatMul and a Conv; float32, bfloat16 and float16 scales), and the search is skipped only for nodes inside."""
    from types import SimpleNamespace

    import numpy as np

    from llc_onnx.config import QuantConfig
    from llc_onnx.flows import roundings
    from llc_onnx.flows.roundings import Rounder
    from llc_onnx.targets.base import Format

    searched = []
    real = roundings._relative_error

    def spy(w, spec, node):
        searched.append(spec.scale_method)
        return real(w, spec, node)

    rng = np.random.default_rng(3)
    matmul, conv = SimpleNamespace(out_axis=1, reduce_axis=0), SimpleNamespace(out_axis=0, reduce_axis=1)
    # a MatMul whose reduction (70) leaves a padded last block of 32, and a Conv blocked over C·kH·kW
    weights = [((70, 48), matmul), ((8, 3, 3, 3), conv)]
    skipped = 0
    for (shape, node), bits, block, ft in [(wn, b, bs, f) for wn in weights for b in (2, 4, 8) for bs in (None, 32)
                                           for f in ("float32", "bfloat16", "float16")]:
        fmt = Format("qdq", bits=bits, block_size=block, float_type=ft)
        w = (rng.standard_t(3, size=shape) * 0.05).astype(np.float32)  # heavy tails: MSE clips
        exact = real(w, Rounder.spec(SimpleNamespace(cfg=QuantConfig()), fmt), node)
        minmax = real(w, Rounder.spec(SimpleNamespace(cfg=QuantConfig(scale="minmax")), fmt), node)
        assert exact <= minmax * (1 + 1e-6)
        edge = (minmax + roundings.INSIDE_FLOOR) / (1 - roundings.INSIDE_MARGIN)  # the shortcut's threshold
        for radius in (exact * 0.999, exact * 1.001, minmax * 1.01, exact * 0.5, edge * (1 - 1e-9),
                       edge * (1 + 1e-9)):
            r = Rounder(SimpleNamespace(config=SimpleNamespace(quant=QuantConfig(llc_radius=radius))), None)
            searched.clear()
            monkeypatch.setattr(roundings, "_relative_error", spy)
            got = r.inside(w, node, fmt)
            monkeypatch.setattr(roundings, "_relative_error", real)
            assert got == (exact <= radius), (bits, block, ft, radius)
            if searched == ["minmax"]:
                skipped += 1
                assert got and minmax <= radius
    assert skipped >= 36  # radii minmax·1.01 and just above the threshold: decided without the search everywhere
