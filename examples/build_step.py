"""A deployment build step: compress a model with a pinned llc-onnx configuration and gate on the verdict.

    llc-onnx optimize model.onnx --budget 0.3 --print-config > llc.toml   # once: pin the settings, commit the file
    python examples/build_step.py model.onnx data.npz llc.toml -o model.llc.onnx [--summary result.json]

Writes ``model.llc.onnx`` only when the compressed model is verified on the held-out (test) split and exits with
0 (verified), 1 (not verified, nothing written) or 2 (bad input, one line on stderr): the contract of
``llc-onnx optimize``, whose output it reproduces byte for byte —
``llc-onnx optimize model.onnx --data data.npz --config llc.toml -o model.llc.onnx`` writes the same file.

It uses only the public API: ``llc_onnx.load_config``, ``llc_onnx.OptimizeConfig``, ``llc_onnx.optimize`` and
the :class:`llc_onnx.OptimizeResult` it returns.
"""

from __future__ import annotations

import argparse
import sys

import llc_onnx


def build(model: str, data: str, config_path: str | None, out: str, *, summary: str | None = None) -> int:
    """Run the build step; returns the exit code (0 verified, 1 not verified, 2 bad input)."""
    try:
        config = llc_onnx.load_config(config_path) if config_path else llc_onnx.OptimizeConfig()
        result = llc_onnx.optimize(model, data, config, out=out)
    except llc_onnx.LLCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    test = result.splits["test"]
    verdict = "VERIFIED" if result.verified else "NOT VERIFIED"
    written = f"written {result.output}" if result.output else "nothing written"
    print(f"{verdict}: test loss {test.compressed.loss:.6g} vs float {test.reference.loss:.6g} "
          f"({test.n} samples); {100 * result.reduction:.1f} % fewer weight bytes; {written}")
    if summary:
        result.save_json(summary)  # the same JSON as `llc-onnx optimize --json`
    return 0 if result.verified or config.criterion.allow_loss_increase else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the float .onnx model (never modified)")
    ap.add_argument("data", help="labelled data (.npz, a directory of .npz batches, or module:attr)")
    ap.add_argument("config", nargs="?", help="pinned TOML configuration from `llc-onnx optimize --print-config`")
    ap.add_argument("-o", "--out", required=True, help="where the verified model is written")
    ap.add_argument("--summary", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    return build(args.model, args.data, args.config, args.out, summary=args.summary)


if __name__ == "__main__":
    raise SystemExit(main())
