"""CalibrationDataReader-style objects for the intake fuzzing (``--data _fuzz_readers:NAME``): each one a way a
user's reader can be right or wrong. The model they feed is ``test_fuzz_intake``'s MLP (input ``x`` [N, 4])."""

from __future__ import annotations

import numpy as np

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(48, 4)).astype(np.float32)
_Y = _RNG.integers(0, 3, size=48).astype(np.int64)


class _Reader:
    def __init__(self, items):
        self.items = list(items)

    def get_next(self):
        return self.items.pop(0) if self.items else None


def good():
    return _Reader({"x": _X[i:i + 16], "labels": _Y[i:i + 16]} for i in range(0, 48, 16))


def empty():
    return _Reader([])


def not_a_dict():
    return _Reader([[_X[:16], _Y[:16]]])


def strings():
    return _Reader([{"x": np.array(["a"] * 16), "labels": _Y[:16]}])


def ragged():
    return _Reader([{"x": _X[:16], "labels": _Y[:15]}])


def missing_input():
    return _Reader([{"labels": _Y[:16]}])


def extra_input():
    return _Reader([{"x": _X[:16], "z": _X[:16], "labels": _Y[:16]}])


def nan_inputs():
    x = _X[:16].copy()
    x[3, 1] = np.nan
    return _Reader([{"x": x, "labels": _Y[:16]}])


def raises():
    class Broken:
        def get_next(self):
            raise RuntimeError("the database is down")

    return Broken()


def no_get_next():
    return object()


def factory_raises():
    raise ValueError("bad credentials")


def varying_shapes():
    return _Reader([{"x": _X[:16], "labels": _Y[:16]}, {"x": _X[:16, :3], "labels": _Y[:16]}])


def mixed_labels():
    return _Reader([{"x": _X[:16], "labels": _Y[:16]}, {"x": _X[16:32]}])


def float_labels():
    return _Reader([{"x": _X[:16], "labels": _Y[:16].astype(np.float32) + 0.5}] * 2)


def labels_out_of_range():
    return _Reader([{"x": _X[:16], "labels": _Y[:16] + 7}, {"x": _X[16:32], "labels": -_Y[16:32] - 1}])


def object_array():
    return _Reader([{"x": np.array([object()] * 16), "labels": _Y[:16]}])


def scalar():
    return _Reader([{"x": np.float32(1.0), "labels": _Y[:1]}])


def huge_batch_count():
    return _Reader({"x": _X[i:i + 1], "labels": _Y[i:i + 1]} for i in range(48))


READERS = [name for name, obj in list(globals().items())
           if getattr(obj, "__module__", None) == __name__ and callable(obj) and not name.startswith("_")]
