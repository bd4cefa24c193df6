"""flows.roundings.choose_per_level: which rounding ``--rounding auto`` keeps per level outside the neighbourhood."""

from llc_onnx.flows.roundings import choose_per_level
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
