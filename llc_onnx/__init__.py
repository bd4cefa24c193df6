"""llc-onnx: loss-aware post-training compression of ONNX models, verified on held-out data.

Public API (``llc_onnx.optimize(model, data, config)`` and friends; the CLI is a view of it)::

    import llc_onnx
    cfg = llc_onnx.OptimizeConfig(quant=llc_onnx.QuantConfig(budget=0.25))
    result = llc_onnx.optimize("model.onnx", "calib.npz", cfg, out="model.llc.onnx")
    result.verified, result.reduction, result.splits["test"].compressed.loss

Pipeline at a glance: ``calib/`` collects data splits, losses and gradients, ``solvers/`` decides,
``passes/`` rewrites, ``flows/`` wires a method, ``verify`` chooses on validation and judges on test,
``api`` runs it all.
"""

__version__ = "0.2.0"

from .config import (  # noqa: E402
    ConfigError,
    CriterionConfig,
    DataConfig,
    DeviceConfig,
    LowRankConfig,
    OptimizeConfig,
    QuantConfig,
    SeriesConfig,
    TargetConfig,
    load_config,
    to_toml,
)
from .errors import LLCError  # noqa: E402


def __getattr__(name):  # the pipeline imports torch and onnxruntime: load it on first use
    if name in ("optimize", "inspect", "compare", "expand", "check", "run", "engine", "CompareResult"):
        from . import api

        return getattr(api, name)
    if name in ("OptimizeResult", "NotVerifiedError"):
        from . import result

        return getattr(result, name)
    if name == "Dataset":
        from .calib.data import Dataset

        return Dataset
    raise AttributeError(f"module 'llc_onnx' has no attribute {name!r}")


__all__ = ["optimize", "inspect", "compare", "expand", "check", "run", "engine", "CompareResult", "OptimizeConfig", "DataConfig",
           "CriterionConfig", "QuantConfig", "LowRankConfig", "SeriesConfig", "TargetConfig", "DeviceConfig",
           "OptimizeResult", "NotVerifiedError", "ConfigError", "LLCError", "Dataset", "load_config", "to_toml", "__version__"]
