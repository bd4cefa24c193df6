"""llc-onnx: loss-aware post-training compression of ONNX models.

Pipeline at a glance: ``calib/`` measures (data, losses, gradients), ``solvers/`` decides (knapsack,
rank search), ``passes/`` rewrites the graph, ``cli`` wires them.
"""

__version__ = "0.1.0"
