"""Which torch function runs which ONNX op: the interpreter's op registry.

An op implementation is ``fn(ctx: OpContext, inputs: list[Tensor | None]) -> Tensor | list[Tensor]``. It is
registered for a (domain, op type) from an opset version on::

    @register_op("Softmax", since_version=13)
    def softmax13(ctx, xs): ...

For a model importing the domain at version v, the implementation with the largest ``since_version ≤ v`` runs
(ONNX's own versioning rule: an op definition holds until the next version of it). Registering the same
(domain, op type, since_version) twice is an error, so a plugin cannot silently replace a built-in op.

Domains: ``""`` is the ONNX domain (``"ai.onnx"`` is the same domain), ``"com.microsoft"`` ONNX Runtime's
contrib ops. Third-party packages add ops through the entry-point group ``llc_onnx.interpreter_ops``: each
entry point names a module (or callable) that registers its ops when loaded; :func:`load_plugins` loads them
once, before the first graph is built.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from ..errors import LLCError

__all__ = ["OpContext", "OpFn", "register_op", "register_ops", "lookup", "supported_ops", "load_plugins",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "llc_onnx.interpreter_ops"
ONNX_DOMAIN = ""

OpFn = Callable[["OpContext", list], Any]

# (domain, op type) -> ascending since_versions and the implementation of each
_REGISTRY: dict[tuple[str, str], tuple[list[int], list[OpFn]]] = {}
_plugins_loaded = False


def _domain(domain: str | None) -> str:
    return ONNX_DOMAIN if domain in (None, "", "ai.onnx") else domain


class OpContext:
    """What an op implementation sees: the graph's settings (dtype, device, opset) and the node."""

    __slots__ = ("g", "node", "attrs")

    def __init__(self, g, node):
        self.g = g
        self.node = node
        self.attrs = node.attrs

    def a(self, name: str, default: Any = None) -> Any:
        """Attribute ``name`` of the node (``default`` when absent)."""
        return self.attrs.get(name, default)

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    @property
    def device(self) -> torch.device:
        return self.g.device

    @property
    def opset(self) -> int:
        """The version the model imports for this node's domain."""
        return self.g.domain_version(self.node.domain)

    def outer_scope(self, xs: list) -> dict:
        """For a node with subgraphs: the enclosing-scope values its subgraphs read (name -> tensor), which
        the executor passes after the node's own inputs in ``xs``."""
        return dict(zip(self.node.implicit, xs[self.node.n_explicit:]))

    def subgraph(self, attr: str):
        """The runnable subgraph of graph attribute ``attr`` (``interpreter.graph.Subgraph``)."""
        return self.g.subgraph(self.node, attr)

    def fail(self, what: str) -> LLCError:
        return LLCError(f"node '{self.node.key}' (op {self.node.op}): {what}")


def register_op(op_type: str, domain: str = "", since_version: int = 1) -> Callable[[OpFn], OpFn]:
    """Decorator: ``fn`` implements ``op_type`` of ``domain`` from opset ``since_version`` on (see module doc).
    A second registration of the same (domain, op type, since_version) raises ``ValueError``."""
    key = (_domain(domain), op_type)
    since = int(since_version)
    if since < 1:
        raise ValueError(f"register_op({op_type!r}): since_version must be ≥ 1, not {since_version}")

    def deco(fn: OpFn) -> OpFn:
        versions, fns = _REGISTRY.setdefault(key, ([], []))
        if since in versions:
            raise ValueError(f"register_op: {key[0] or 'ai.onnx'}::{op_type} since version {since} is already "
                             f"registered ({fns[versions.index(since)].__module__}); register another version "
                             "or another domain")
        i = bisect.bisect(versions, since)
        versions.insert(i, since)
        fns.insert(i, fn)
        return fn

    return deco


def register_ops(*op_types: str, domain: str = "", since_version: int = 1) -> Callable[[OpFn], OpFn]:
    """:func:`register_op` for several op types sharing one implementation (e.g. ArgMax and ArgMin)."""
    def deco(fn: OpFn) -> OpFn:
        for op in op_types:
            register_op(op, domain, since_version)(fn)
        return fn

    return deco


def lookup(op_type: str, domain: str, version: int) -> OpFn | None:
    """The implementation that runs ``op_type`` of ``domain`` imported at ``version`` (None: unsupported)."""
    entry = _REGISTRY.get((_domain(domain), op_type))
    if entry is None:
        return None
    versions, fns = entry
    i = bisect.bisect_right(versions, int(version)) - 1
    return fns[i] if i >= 0 else None


def supported_ops() -> dict[str, list[str]]:
    """Domain (``"ai.onnx"`` for the ONNX domain) -> sorted op types with at least one implementation."""
    out: dict[str, list[str]] = {}
    for (domain, op) in _REGISTRY:
        out.setdefault(domain or "ai.onnx", []).append(op)
    return {d: sorted(ops) for d, ops in sorted(out.items())}


def load_plugins() -> list[str]:
    """Load every entry point of :data:`ENTRY_POINT_GROUP` once (importing it registers its ops; a callable
    entry point is called). Returns the names loaded. A plugin that fails to load is a one-line error."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    names = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's to fix, said in one line
            raise LLCError(f"interpreter plugin '{ep.name}' ({ep.value}): failed to load "
                           f"({type(exc).__name__}: {exc}); fix or uninstall it") from None
        names.append(ep.name)
    return names
