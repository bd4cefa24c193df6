"""What an optimization does, as frozen dataclasses: the one configuration the API, the CLI and TOML share.

:class:`OptimizeConfig` holds one section per concern — ``data`` (splits), ``criterion`` (what "not worse"
means and how back-off steers), ``quant``, ``lowrank``, ``series``, ``target`` and ``device`` — plus the methods
to run.
Every field is validated in ``__post_init__``; a bad value raises :class:`ConfigError` naming the field
(``quant.bits``). Each field also carries its command-line flag (``--bits``) in its metadata: the CLI builds
its options from these fields (:func:`cli_fields`) and maps a :class:`ConfigError` back to the flag, so the
two cannot drift.

TOML (``--config llc.toml``) uses the same names::

    method = ["quant"]
    [quant]
    bits = [2, 4, 8, 16, "float"]
    budget = 0.25
    [criterion]
    objective = "task"

:func:`load_config` reads it (unknown keys are errors), :func:`to_toml` writes the effective configuration
back so a build can pin it; ``from_dict(to_dict(c)) == c``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

from .errors import LLCError

__all__ = ["OptimizeConfig", "DataConfig", "CriterionConfig", "QuantConfig", "LowRankConfig", "SeriesConfig",
           "TargetConfig",
           "DeviceConfig", "ConfigError", "load_config", "to_toml", "from_dict", "to_dict", "cli_fields",
           "FLOAT", "METHODS", "TARGETS"]

FLOAT = "float"  # the level that keeps a node in float
METHODS = ("quant", "lowrank", "series")
#: the method lists an optimization runs (``quant`` and ``series`` given together share one knapsack)
METHOD_CHOICES = (("quant",), ("lowrank",), ("lowrank", "quant"), ("series",), ("quant", "series"),
                  ("lowrank", "series"), ("lowrank", "quant", "series"))
TARGETS = ("ort-cpu", "ort-cuda", "tensorrt", "qdq")  # llc_onnx.targets: one module each
Objective = Literal["auto", "task", "fidelity"]


class ConfigError(LLCError):
    """A configuration value out of its domain. ``field`` is the dotted config name (``quant.bits``); the CLI
    shows the flag instead (``--bits``)."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field = field_name
        self.value = value
        self.reason = reason
        super().__init__(f"{field_name} {_show(value)}: {reason}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "()"
    return repr(value) if isinstance(value, str) else str(value)


# -------------------------------------------------------------------------------------------- fields
def opt(default: Any, flag: str, help: str, *, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
        cli: bool = True, **kw) -> Any:
    """A config field with its CLI flag, help text and string parser (the CLI's view of the field)."""
    meta = {"flag": flag, "help": help, "parse": parse, "metavar": metavar, "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata=meta, **kw)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError("expected comma-separated numbers, e.g. 0.1,0.2,0.3") from None


def _levels(text: str) -> tuple:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        if t in ("float", "fp32", "32"):
            out.append(FLOAT)
        elif t.isdigit():
            out.append(int(t))
        elif t:
            raise ValueError("levels are 2, 4, 8, 16 and float (e.g. --bits 4,8,float)")
    return tuple(out)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError("expected comma-separated integers, e.g. 1,2,3") from None


def _block_sizes(text: str) -> int | tuple[int, ...]:
    sizes = _ints(text)
    return sizes[0] if len(sizes) == 1 else sizes


def _words(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def _check(cond: bool, name: str, value: Any, reason: str) -> None:
    if not cond:
        raise ConfigError(name, value, reason)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _choice(name: str, value: Any, choices) -> None:
    _check(value in choices, name, value, "choose one of " + ", ".join(map(str, choices)))


# -------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """How the data is split. The *test* split (``held=`` / ``--held``, else ``holdout`` of ``--data``) gives
    the verdict once; the rest is calibration, of which ``val_fraction`` (or ``val=`` / ``--val``) is the
    validation split that steers back-off; the remaining calibration data is cut into fit and measure parts."""

    holdout: float = opt(0.5, "--holdout", "test fraction of --data when --held is not given (default 0.5)")
    val_fraction: float = opt(0.25, "--val-fraction",
                              "validation fraction of the calibration data when --val is not given (default 0.25)")
    seed: int = opt(0, "--seed", "seed of every split (default 0)")
    batch_size: int = opt(64, "--batch-size", "samples per batch (default 64)")
    measure_samples: int | None = opt(None, "--measure-samples",
                                      "measure part of the calibration split: whole seeded batches holding ≥ N "
                                      "samples (default: half the batches); the other batches are the fit part")

    def __post_init__(self):
        _check(_finite(self.holdout) and 0 < self.holdout < 1, "data.holdout", self.holdout,
               "a fraction in (0, 1), e.g. 0.5")
        _check(_finite(self.val_fraction) and 0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction,
               "a fraction in [0, 1), e.g. 0.25 (0: validate on the calibration data itself)")
        _check(isinstance(self.seed, int) and self.seed >= 0, "data.seed", self.seed, "must be an integer ≥ 0")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "data.batch_size", self.batch_size,
               "must be an integer ≥ 1")
        _check(self.measure_samples is None or (isinstance(self.measure_samples, int) and self.measure_samples >= 1),
               "data.measure_samples", self.measure_samples, "must be an integer ≥ 1")


@dataclass(frozen=True)
class CriterionConfig:
    """What "no worse" means and how the search may use its measurements.

    ``objective``: ``task`` — the labelled loss (``loss``, e.g. cross-entropy); ``fidelity`` — the KL
    divergence of the compressed model's outputs from the float model's own outputs (no labels needed);
    ``auto`` — task when the data has labels, else fidelity. The verdict: the compressed model's test loss
    ≤ float's + ``tolerance`` (task), or its test KL ≤ ``tolerance`` (fidelity, where 0 is unreachable: the
    default tolerance there is 0.002 nats per prediction).
    """

    objective: Objective = opt("auto", "--objective", "task | fidelity | auto (default: task when the data has "
                               "labels, else fidelity)")
    loss: str | None = opt(None, "--loss", "ce | lm | mse | module:function (default: lm for LMs, else ce)")
    output: str | None = opt(None, "--output", "graph output the loss reads (default: the first output)")
    tolerance: float | None = opt(None, "--tolerance", "verified when test loss ≤ float + this (task, default 0) "
                                  "or test KL ≤ this (fidelity, default 0.002)")
    error_max: float = opt(1e-4, "--error-max", "neighbourhood check |measured − predicted| ≤ this (default 1e-4)")
    relative: bool = opt(False, "--relative", "--error-max is relative to the calibration loss")
    outside: Literal["measured", "drop"] = opt("measured", "--outside",
                                               "levels outside the neighbourhood: cost = measured ΔL (default) or dropped")
    margin_z: float = opt(1.0, "--margin-z", "add z standard errors of each measured ΔL to its cost; "
                          "0 = the papers' plain rule (default 1)")
    gain_credit: float = opt(0.5, "--gain-credit",
                             "lossless: measured gains (negative costs) count this much when they pay for other "
                             "nodes' costs (default 0.5; 1 = the papers' plain sum)")
    max_node_cost: float = opt(0.01, "--max-node-cost",
                               "lossless: a level whose cost alone exceeds this fraction of the float calibration "
                               "loss is not offered (default 0.01)")
    max_rounds: int = opt(8, "--max-rounds", "validation back-off rounds (default 8)")
    allow_loss_increase: bool = opt(False, "--allow-loss-increase",
                                    "write the model (marked NOT VERIFIED) and exit 0 even when it is not verified")

    def __post_init__(self):
        _choice("criterion.objective", self.objective, get_args(Objective))
        _check(self.tolerance is None or (_finite(self.tolerance) and self.tolerance >= 0), "criterion.tolerance",
               self.tolerance, "must be ≥ 0")
        for name in ("error_max", "margin_z", "max_node_cost"):
            v = getattr(self, name)
            _check(_finite(v) and v >= 0, f"criterion.{name}", v, "must be ≥ 0")
        _check(_finite(self.gain_credit) and 0 <= self.gain_credit <= 1, "criterion.gain_credit", self.gain_credit,
               "a fraction in [0, 1]")
        _choice("criterion.outside", self.outside, ("measured", "drop"))
        _check(isinstance(self.max_rounds, int) and self.max_rounds >= 0, "criterion.max_rounds", self.max_rounds,
               "must be an integer ≥ 0")

    def verdict_tolerance(self, objective: str) -> float:
        """The tolerance of the verdict under the resolved objective (see the class doc)."""
        if self.tolerance is not None:
            return self.tolerance
        return 0.002 if objective == "fidelity" else 0.0


@dataclass(frozen=True)
class QuantConfig:
    """Mixed-precision quantization: one level per node from ``bits``, chosen by the grouped knapsack."""

    bits: tuple = opt((2, 4, 8, 16, FLOAT), "--bits", "quantization levels per node (default 2,4,8,16,float)",
                      parse=_levels)
    block_size: int | tuple = opt(32, "--block-size",
                                  "block along the reduction axis for 2/4-bit (default 32); several, e.g. 32,128: "
                                  "each 2/4-bit level is offered at every block size and the knapsack picks one "
                                  "per node", parse=_block_sizes)
    scale: Literal["mse", "minmax", "aciq", "hqq"] = opt(
        "mse", "--scale", "weight scales: mse (default), minmax, aciq, hqq (half-quadratic, data-free)")
    rounding: Literal["auto", "llc", "nearest", "gptq", "cet", "up", "down"] = opt(
        "auto", "--rounding", "auto (default): LLC sign-directed rounding inside the first-order neighbourhood, "
        "elsewhere per level GPTQ unless another of quant.auto_roundings measures better by > 2 standard errors on "
        "the calibration split; or one of "
        "llc, nearest, gptq (error feedback over the input Gram), cet (error off the Hessian's short axes)")
    auto_roundings: tuple = opt(("nearest", "gptq"), "--auto-roundings",
                                "the roundings --rounding auto measures outside the neighbourhood "
                                "(default nearest,gptq; cet adds the curvature pass)", parse=_words)
    rounding_probe: int = opt(32, "--rounding-probe",
                              "--rounding auto outside the neighbourhood: measure every rounding of "
                              "--auto-roundings on at most N nodes per level, spread evenly through the graph, "
                              "choose the level's rounding from them and measure only that one on the level's "
                              "other nodes (default 32; 0: every rounding on every node)", metavar="N")
    llc_radius: float = opt(0.05, "--llc-radius",
                            "LLC rounding only where nearest rounding's ‖δ‖/‖W‖ ≤ this; beyond it the other "
                            "roundings (default 0.05)")
    gptq_act_order: bool = opt(True, "--gptq-act-order", "GPTQ: quantize columns in order of decreasing input "
                               "energy (default on)")
    gptq_damp: float = opt(0.01, "--gptq-damp", "GPTQ: dampening λ = damp · mean diag(XᵀX) (default 0.01)")
    cet_k: int | None = opt(None, "--cet-k", "CET: short-axis eigenpairs per node (default 32 with the Fisher "
                            "curvature, 8 with Lanczos)", metavar="K")
    cet_curvature: Literal["fisher", "lanczos"] = opt(
        "fisher", "--cet-curvature", "CET: the curvature model of each node — fisher (default: the sampled "
        "Gauss-Newton block from per-sample gradients, one pass) or lanczos (H_ii itself, negative axes too; "
        "--cet-steps passes of one second backward per node)", metavar="fisher|lanczos")
    cet_samples: int = opt(128, "--cet-samples", "CET: samples of each curvature pass, a seeded sub-sample of the "
                           "calibration part it reads (rounding: fit part; --cost cet: the whole calibration split, "
                           "or the measure part when CET rounding is used; default 128)", metavar="N")
    cet_steps: int | None = opt(None, "--cet-steps", "CET: Lanczos steps, one pass over the curvature samples "
                                "each (default k + 8; --cet-curvature lanczos)", metavar="N")
    joint_rounds: int = opt(2, "--joint-rounds",
                            "re-solves after measuring the solver's plan jointly on the calibration measure part, "
                            "its gap to the predicted sum attributed to the nodes (default 2; 0: off)")
    activations: bool = opt(False, "--activations", "also quantize node inputs (per-tensor 8/16-bit)")
    compare_cet: bool = opt(False, "--compare-cet", "also give every measured candidate its CET prediction (one "
                            "curvature pass; the report plots it against the measurement; choices unchanged)")
    cost: Literal["measured", "cet"] = opt("measured", "--cost",
                                           "per-candidate cost: measured loss change (default) or CET second order")
    budget: float | None = opt(None, "--budget", "byte budget as a fraction of float weight bytes")
    avg_bits: float | None = opt(None, "--avg-bits", "byte budget as average bits per weight")
    sweep: tuple = opt((), "--sweep", "also solve these budgets and measure them on the validation split, "
                       "e.g. 0.1,0.15,0.2,0.3", parse=_floats)

    def __post_init__(self):
        levels = tuple(FLOAT if str(b).lower() in ("float", "0", "fp32", "32") else b for b in self.bits)
        object.__setattr__(self, "bits", tuple(dict.fromkeys(levels)))
        for b in self.bits:
            _check(b == FLOAT or b in (2, 4, 8, 16), "quant.bits", self.bits,
                   "levels are 2, 4, 8, 16 and float (e.g. 4,8,float)")
        _check(len(self.bits) > 0, "quant.bits", self.bits, "give at least one level")
        sizes = (self.block_size,) if isinstance(self.block_size, int) else tuple(self.block_size)
        _check(len(sizes) > 0 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes),
               "quant.block_size", self.block_size, "must be an integer ≥ 1 or a list of them (e.g. 32,128)")
        sizes = tuple(sorted(set(sizes)))
        object.__setattr__(self, "block_size", sizes[0] if len(sizes) == 1 else sizes)
        _choice("quant.scale", self.scale, ("mse", "minmax", "aciq", "hqq"))
        _choice("quant.rounding", self.rounding, ("auto", "llc", "nearest", "gptq", "cet", "up", "down"))
        object.__setattr__(self, "auto_roundings", tuple(self.auto_roundings))
        for r in self.auto_roundings:
            _choice("quant.auto_roundings", r, ("nearest", "gptq", "cet"))
        _check(bool(self.auto_roundings), "quant.auto_roundings", self.auto_roundings, "give at least one rounding")
        _check(isinstance(self.rounding_probe, int) and not isinstance(self.rounding_probe, bool)
               and self.rounding_probe >= 0, "quant.rounding_probe", self.rounding_probe,
               "must be an integer ≥ 0 (0: measure every rounding on every node)")
        _check(_finite(self.gptq_damp) and self.gptq_damp > 0, "quant.gptq_damp", self.gptq_damp, "must be > 0")
        for name in ("cet_k", "cet_samples"):
            v = getattr(self, name)
            _check((v is None and name == "cet_k") or (isinstance(v, int) and v >= 1), f"quant.{name}", v,
                   "must be an integer ≥ 1")
        _choice("quant.cet_curvature", self.cet_curvature, ("fisher", "lanczos"))
        k = self.cet_k or 8
        _check(self.cet_steps is None or (isinstance(self.cet_steps, int) and self.cet_steps >= k),
               "quant.cet_steps", self.cet_steps, f"must be an integer ≥ quant.cet_k ({k})")
        _check(isinstance(self.joint_rounds, int) and self.joint_rounds >= 0, "quant.joint_rounds",
               self.joint_rounds, "must be an integer ≥ 0")
        _choice("quant.cost", self.cost, ("measured", "cet"))
        _check(_finite(self.llc_radius) and self.llc_radius >= 0, "quant.llc_radius", self.llc_radius, "must be ≥ 0")
        _check(self.budget is None or self.avg_bits is None, "quant.budget", self.budget,
               "choose one of budget (quant.budget) and average bits (quant.avg_bits)")
        _check(self.budget is None or (_finite(self.budget) and 0 < self.budget <= 1), "quant.budget", self.budget,
               "a fraction of the float weight bytes in (0, 1], e.g. 0.25")
        _check(self.avg_bits is None or (_finite(self.avg_bits) and 0 < self.avg_bits <= 32), "quant.avg_bits",
               self.avg_bits, "average bits per weight in (0, 32], e.g. 4.5")
        object.__setattr__(self, "sweep", tuple(float(s) for s in self.sweep))
        for s in self.sweep:
            _check(_finite(s) and 0 < s <= 1, "quant.sweep", self.sweep, "fractions in (0, 1], e.g. 0.1,0.2,0.3")

    @property
    def lossless(self) -> bool:
        return self.budget is None and self.avg_bits is None

    def levels(self) -> tuple[int, ...]:
        """``bits`` with float as 0, fewest bits first, float last."""
        return tuple(sorted((0 if b == FLOAT else int(b) for b in self.bits), key=lambda b: (b == 0, b)))


@dataclass(frozen=True)
class LowRankConfig:
    """Low-rank factorisation with a rank per node: ``lossless`` (ranks inside the neighbourhood with G·δ < 0)
    or ``compact`` (the smallest model whose measured loss change is within tolerance)."""

    mode: Literal["lossless", "compact"] = opt("lossless", "--mode", "low-rank mode: lossless (default) or compact")
    gamma: float = opt(1e-4, "--gamma", "low-rank neighbourhood ‖δ‖ ≤ γ (default 1e-4)")
    gamma_relative: bool = opt(False, "--gamma-relative", "γ is relative to ‖W‖")
    rank_grid: tuple = opt((1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0), "--rank-grid",
                           "compact low-rank: candidate ranks as fractions of the largest useful rank",
                           parse=_floats)

    def __post_init__(self):
        _choice("lowrank.mode", self.mode, ("lossless", "compact"))
        _check(_finite(self.gamma) and self.gamma > 0, "lowrank.gamma", self.gamma, "must be > 0")
        object.__setattr__(self, "rank_grid", tuple(float(f) for f in self.rank_grid))
        _check(bool(self.rank_grid) and all(_finite(f) and 0 < f <= 1 for f in self.rank_grid), "lowrank.rank_grid",
               self.rank_grid, "fractions in (0, 1], e.g. 0.25,0.5,1")


@dataclass(frozen=True)
class SeriesConfig:
    """Series expansion (FP = xINT, ``llc_onnx.series``): each node's options are T basis terms of b bits,
    W ≈ Σ_t s_t·Q_t, for every b in ``bits`` and T in ``terms`` (one greedy expansion per b, truncated), measured
    like every other candidate and chosen by the same knapsack (method ``series``, or ``quant,series``)."""

    bits: tuple = opt((2, 4, 8), "--series-bits", "bits per series term (default 2,4,8)", parse=_ints)
    terms: tuple = opt((1, 2, 3, 4), "--series-terms", "numbers of series terms T per node (default 1,2,3,4)",
                       parse=_ints)
    block_size: int = opt(32, "--series-block-size",
                          "block of the terms' scales along the reduction axis (default 32; 8-bit terms are per "
                          "channel on the qdq target)")
    form: Literal["standard", "custom"] = opt(
        "standard", "--series-form", "qdq target: standard (default: one DequantizeLinear, tiled input) or "
        "custom (ai.llc_onnx SeriesMatMul/SeriesConv nodes with function bodies)")

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(dict.fromkeys(self.bits)))
        _check(bool(self.bits) and all(b in (2, 4, 8) and not isinstance(b, bool) for b in self.bits), "series.bits",
               self.bits, "bits per term are 2, 4 or 8 (e.g. 2,4)")
        _check(bool(self.terms) and all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 8
                                        for t in self.terms), "series.terms", self.terms,
               "numbers of terms in 1..8 (e.g. 1,2,3)")
        object.__setattr__(self, "terms", tuple(sorted(set(self.terms))))
        _check(isinstance(self.block_size, int) and self.block_size >= 1, "series.block_size", self.block_size,
               "must be an integer ≥ 1 (a power of two ≥ 16 for the MatMulNBits targets)")
        _choice("series.form", self.form, ("standard", "custom"))


@dataclass(frozen=True)
class TargetConfig:
    """Where the model ships (``llc_onnx.targets``): the formats the rewrite may emit, the session the verdict
    runs in, how activations are calibrated where a format quantizes them, and an optional latency budget."""

    name: str = opt("ort-cpu", "--target", "deployment target: ort-cpu (default: fast on ONNX Runtime CPU), "
                    "ort-cuda, tensorrt, qdq (portable weight-only Q/DQ)")
    calibration: Literal["minmax", "percentile", "entropy"] = opt(
        "minmax", "--calibration", "activation ranges where a format quantizes activations: minmax (default), "
        "percentile, entropy (KL)")
    percentile: float = opt(99.999, "--percentile", "percentile of --calibration percentile (default 99.999)")
    latency_budget: float | None = opt(None, "--latency-budget",
                                       "end-to-end latency budget as a fraction of the float model's, measured on "
                                       "the target at the calibration batch, e.g. 0.5")
    latency_batches: tuple = opt((), "--latency-batches",
                                 "batch sizes the latency budget must hold at, each timed, and the summary's "
                                 "latency rows (e.g. 1,4; inputs made from the calibration samples; default: "
                                 "the budget at the calibration batch, the summary at it and at batch 1)",
                                 parse=_ints, metavar="N[,N...]")
    w8a8_codes: int = opt(7, "--w8a8-codes", "ort-cpu: bits of W8A8 weight codes: 7 (default: exact on every "
                          "x86 CPU) or 8 (half the rounding error; only for CPUs whose int8 kernels do not "
                          "saturate: x86 with AVX512-VNNI/AVX-VNNI, ARM64; refused on others)")
    w8a8_activations: Literal["auto", "static", "dynamic", "both"] = opt(
        "auto", "--w8a8-activations", "ort-cpu: W8A8 activations of MatMuls: static (calibrated ranges), dynamic "
        "(quantized per run: DynamicQuantizeMatMul), both (one candidate each), auto (default: both with "
        "--latency-budget, else static)")
    plugins: bool = opt(False, "--plugins", "tensorrt: offer plugin nodes for levels TensorRT has no kernel for")
    measure_latency: bool = opt(True, "--latency", "measure the float and the final model's end-to-end latency "
                                "on the target (calibration batch and batch 1) for the summary (default on)")

    def __post_init__(self):
        _choice("target.name", self.name, TARGETS)
        _choice("target.calibration", self.calibration, ("minmax", "percentile", "entropy"))
        _check(_finite(self.percentile) and 0 < self.percentile <= 100, "target.percentile", self.percentile,
               "a percentage in (0, 100], e.g. 99.999")
        _check(self.latency_budget is None or (_finite(self.latency_budget) and self.latency_budget > 0),
               "target.latency_budget", self.latency_budget, "a fraction of the float model's latency, e.g. 0.5")
        _check(self.w8a8_codes in (7, 8) and not isinstance(self.w8a8_codes, bool), "target.w8a8_codes",
               self.w8a8_codes, "7 or 8")
        _check(self.w8a8_codes == 7 or self.name == "ort-cpu", "target.w8a8_codes", self.w8a8_codes,
               "8-bit W8A8 codes are an ort-cpu option")
        _choice("target.w8a8_activations", self.w8a8_activations, ("auto", "static", "dynamic", "both"))
        _check(self.w8a8_activations in ("auto", "static") or self.name == "ort-cpu", "target.w8a8_activations",
               self.w8a8_activations, "dynamic W8A8 is an ort-cpu option")
        object.__setattr__(self, "latency_batches", tuple(dict.fromkeys(self.latency_batches)))
        _check(all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.latency_batches),
               "target.latency_batches", self.latency_batches, "batch sizes are integers ≥ 1 (e.g. 1,4)")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the measurements run."""

    device: str = opt("cpu", "--device", "device of gradients and measurements: cpu (default) or cuda")
    threads: int = opt(0, "--threads", "ONNX Runtime batches run at once, one thread each (default 0: one per "
                       "CPU; with several workers CPUs / workers each); the interpreter runs on one thread: the "
                       "output does not depend on it")
    workers: int = opt(1, "--workers", "processes measuring candidates in parallel (torch.distributed: gloo on CPU, "
                       "NCCL with one GPU each on cuda); same bytes for any number at the same --threads (default 1)")

    def __post_init__(self):
        _check(self.device == "cpu" or self.device.startswith("cuda"), "device.device", self.device,
               "cpu or cuda (cuda:N)")
        _check(isinstance(self.threads, int) and self.threads >= 0, "device.threads", self.threads,
               "must be an integer ≥ 0")
        _check(isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers >= 1,
               "device.workers", self.workers, "must be an integer ≥ 1")


@dataclass(frozen=True)
class OptimizeConfig:
    """One optimization: the methods in order (``("lowrank", "quant")`` factors, then quantizes the factors)
    and every section above."""

    method: tuple = opt(("quant",), "--method", "quant (default), lowrank, series, or a combination: lowrank,quant; "
                        "quant,series (one knapsack over both); lowrank,series; lowrank,quant,series", parse=_words)
    data: DataConfig = field(default_factory=DataConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    nodes: tuple = opt((), "--nodes", "compress only these nodes (comma-separated names; default all)",
                       parse=_words)
    cache_dir: str | None = opt(None, "--cache", "keep the gradients and measured candidates here and reuse them "
                                "when model, data and settings are the same", metavar="DIR")
    cache_codes: bool = opt(True, "--cache-codes", "with --cache: also keep every measured candidate's rounded "
                            "codes there (about one byte per weight per format), so later stages and runs read "
                            "them instead of rounding again (default on)")

    def __post_init__(self):
        method = tuple(self.method) if not isinstance(self.method, str) else _words(self.method)
        object.__setattr__(self, "method", method)
        _check(method in METHOD_CHOICES, "method", method,
               "one of " + "; ".join(",".join(m) for m in METHOD_CHOICES))
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if self.quant.activations and self.target.name != "qdq":
            raise ConfigError("quant.activations", True, "applies to the qdq target; the other targets quantize "
                              "activations where their formats need it (target.name qdq, --target qdq)")
        if "series" in method:
            if self.series.form == "custom" and self.target.name != "qdq":
                raise ConfigError("series.form", "custom", f"applies to target qdq; target {self.target.name} writes "
                                  "its own series form (--target qdq, or --series-form standard)")
            if self.target.name == "tensorrt" and not self.target.plugins:
                raise ConfigError("target.plugins", False, "TensorRT runs series terms only as plugin nodes; add "
                                  "--plugins (target.plugins = true) or choose another target")
        if not {"quant", "series"} & set(method) and not (self.quant.lossless and not self.quant.sweep):
            raise ConfigError("quant.budget", self.quant.budget if self.quant.budget is not None else
                              self.quant.avg_bits or self.quant.sweep,
                              "budgets and sweeps apply to quantization and series; with method lowrank use "
                              "lowrank.mode compact (smallest model not worse) or method lowrank,quant")

    @property
    def stages(self) -> tuple[str, ...]:
        """The flows run in order: ``lowrank``, then one knapsack stage over the quantization families given
        (``quant``, ``series`` or ``quant+series``)."""
        families = [m for m in self.method if m in ("quant", "series")]
        return tuple(m for m in self.method if m == "lowrank") + (("+".join(families),) if families else ())


SECTIONS = {"data": DataConfig, "criterion": CriterionConfig, "quant": QuantConfig, "lowrank": LowRankConfig,
            "series": SeriesConfig, "target": TargetConfig, "device": DeviceConfig}


# -------------------------------------------------------------------------------------------- dict / TOML
def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def to_dict(config: OptimizeConfig, *, skip_none: bool = False) -> dict:
    """Nested plain dict (tuples as lists); ``skip_none`` leaves out unset optional fields (TOML has no null)."""
    out: dict = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = {g.name: _plain(getattr(v, g.name)) for g in dataclasses.fields(v)
                           if not (skip_none and getattr(v, g.name) is None)}
        elif not (skip_none and v is None):
            out[f.name] = _plain(v)
    return out


def from_dict(d: dict, base: OptimizeConfig | None = None, source: str = "config") -> OptimizeConfig:
    """A config from a nested dict over ``base`` (defaults): unknown keys are errors naming the key."""
    base = base or OptimizeConfig()
    top: dict = {}
    sections = {name: {} for name in SECTIONS}
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise LLCError(f"{source}: [{key}] must be a table of settings")
            known = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for k, v in value.items():
                if k not in known:
                    raise LLCError(f"{source}: unknown setting {key}.{k}; known: {', '.join(sorted(known))}")
                sections[key][k] = tuple(v) if isinstance(v, list) else v
        elif key in {f.name for f in dataclasses.fields(OptimizeConfig)}:
            top[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise LLCError(f"{source}: unknown setting {key!r}; top-level keys are method, nodes, cache_dir, "
                           f"cache_codes and the sections {', '.join(SECTIONS)}")
    parts = {name: dataclasses.replace(getattr(base, name), **sections[name]) for name in SECTIONS}
    return dataclasses.replace(base, **top, **parts)


def load_config(path: str, base: OptimizeConfig | None = None) -> OptimizeConfig:
    """Read a TOML config file (see the module doc) over ``base``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise LLCError(f"{path}: config file not found; check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise LLCError(f"{path}: not valid TOML ({exc}); fix the file") from None
    return from_dict(data, base, source=path)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(config: OptimizeConfig) -> str:
    """The configuration as TOML (unset optional fields are left out, so reading it back gives ``config``)."""
    d = to_dict(config, skip_none=True)
    lines = ["# llc-onnx optimize configuration (llc-onnx optimize --config FILE)"]
    for k, v in d.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- CLI view
@dataclasses.dataclass(frozen=True)
class CliField:
    """One config field as the CLI sees it."""

    path: str  # "quant.bits"
    flag: str  # "--bits"
    help: str
    type: Any
    default: Any
    parse: Callable[[str], Any] | None
    metavar: str | None


def cli_fields() -> list[CliField]:
    """Every CLI-visible field of :class:`OptimizeConfig`, sections included, in declaration order."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS and prefix == "":
                walk(SECTIONS[f.name], f.name + ".")
                continue
            if f.metadata.get("cli"):
                out.append(CliField(prefix + f.name, f.metadata["flag"], f.metadata["help"], f.type, f.default,
                                    f.metadata.get("parse"), f.metadata.get("metavar")))

    walk(OptimizeConfig, "")
    return out


def with_values(config: OptimizeConfig, values: dict[str, Any]) -> OptimizeConfig:
    """``config`` with dotted fields replaced (``{"quant.bits": (4, 8)}``), validated."""
    top, sections = {}, {}
    for path, v in values.items():
        if "." in path:
            sec, name = path.split(".", 1)
            sections.setdefault(sec, {})[name] = v
        else:
            top[path] = v
    parts = {sec: dataclasses.replace(getattr(config, sec), **kv) for sec, kv in sections.items()}
    return dataclasses.replace(config, **top, **parts)
