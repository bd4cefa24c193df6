"""The built-in op implementations, one module per family; importing this package registers them all."""

from . import contrib, control, elementwise, image, nn, quant, reduce, series, tensor  # noqa: F401  (registration on import)
