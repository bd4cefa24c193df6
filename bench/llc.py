"""llc-onnx rows: the real CLI as a subprocess (``llc-onnx optimize ... --json``), its result summarized.

One run is the whole method as a user runs it: loading, measuring, solving, the validation back-off and the
one-shot verdict on the test split, in a fresh process (so memory and time are the run's own). The model is
written even when it is not verified (``--allow-loss-increase``: it is marked ``llc_onnx.verified=false``), so
the benchmark can judge it; VERIFIED is the CLI's own verdict. ``--no-latency``: the benchmark measures every
row's latency itself, the same way (``bench.latency``). An option the CLI does not know (a flag being wired
in) makes it exit 2 with a one-line message: the row says "refused" with that line.

:func:`summarize` turns ``OptimizeResult.to_dict()`` into what a row reports: target and its session,
objective, the three splits with their sizes, the test loss (and the task loss under the fidelity objective),
bytes, levels, and per stage the validation back-off (rounds, whether the solver's first plan passed, the plan
kept, every plan measured).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(model: Path, calib: Path, test: Path, out: Path, batch_size: int, measure_samples: int | None,
            extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "llc_onnx", "optimize", str(model), "--data", str(calib), "--held", str(test),
           "--batch-size", str(batch_size), "-o", str(out), "--json", "--allow-loss-increase", "--no-latency"]
    if measure_samples:
        cmd += ["--measure-samples", str(measure_samples)]
    return cmd + list(extra)


def printable(cmd: list[str]) -> str:
    return "llc-onnx " + " ".join(shlex.quote(c) for c in cmd[3:])


#: seconds a timed-out run gets to stop after SIGTERM
TERMINATE_GRACE_S = 60


def run(cmd: list[str], result_path: Path, timeout: float | None = None) -> dict:
    """Run the CLI; {"command", "seconds", "exit", "result" (the JSON) | "error"}. The JSON is kept at
    ``result_path``."""
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: llc-onnx then removes its temporary files (a SIGKILL would leave its spill files in
            # $TMPDIR until the next run); SIGKILL only if it does not stop
            p.terminate()
            try:
                p.communicate(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
            return {"command": printable(cmd), "seconds": time.perf_counter() - t0, "exit": "timeout",
                    "error": f"stopped after {timeout:.0f} s (--llc-timeout)"}
    res = {"command": printable(cmd), "seconds": time.perf_counter() - t0, "exit": p.returncode}
    out = (stdout or "").strip()
    if p.returncode not in (0, 1) or not out:
        lines = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()]
        res["error"] = lines[-1] if lines else f"exit {p.returncode}, no output"
        return res
    result_path.write_text(out + "\n")
    res["result"] = json.loads(out.splitlines()[-1] if not out.startswith("{") else out)
    return res


def summarize(d: dict) -> dict:
    """The row's view of a result JSON (module doc)."""
    sp = d["splits"]
    test = sp["test"]
    out = {"verified": d["verified"], "objective": d["objective"], "loss": d["loss"], "tolerance": d["tolerance"],
           "target": d["target"]["name"], "session": d["target"].get("session"),
           "splits": {k: {"n": v["n"], "role": v["role"],
                          "reference": (v.get("reference") or {}).get("loss"),
                          "compressed": (v.get("compressed") or {}).get("loss")} for k, v in sp.items()},
           "test_reference": test["reference"]["loss"], "test_compressed": test["compressed"]["loss"],
           "bytes": d["bytes"]["compressed"], "bytes_reference": d["bytes"]["reference"],
           "levels": d["levels"], "notes": d.get("notes", []), "seconds": d.get("seconds", {}),
           "adapted": sp["calibration"].get("adapted"), "in_sample": sp["calibration"].get("in_sample"),
           "val_same_as_calibration": sp["validation"].get("same_as_calibration")}
    if "task_loss" in test:
        t = test["task_loss"]
        out["task_test_reference"], out["task_test_compressed"] = t["reference"], t["compressed"]
    stages = []
    for st in d["stages"]:
        stages.append({"method": st["method"], "levels": st["levels"], "chosen_plan": st["chosen_plan"],
                       "first_plan_passed": st["first_plan_passed"], "backoff_rounds": st["backoff_rounds"],
                       "plans": st["plans"], "cache": st.get("cache"), "bytes": st["bytes"],
                       "refused": (st.get("settings") or {}).get("refused"),
                       "latency": (st.get("settings") or {}).get("latency"),
                       "joint": (st.get("settings") or {}).get("joint")})
    out["stages"] = stages
    return out


def cached_seconds(summary: dict) -> float:
    """Measurement seconds a run reused from the cache (added to its wall time: the row's time is the whole
    method's, not the part this run happened to redo)."""
    return sum((st.get("cache") or {}).get("seconds", 0.0) for st in summary["stages"]
               if (st.get("cache") or {}).get("hit"))
