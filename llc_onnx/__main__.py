"""``python -m llc_onnx`` — same as the ``llc-onnx`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
