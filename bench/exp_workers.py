"""Wall time of candidate measurement with 1 and N workers (``--workers``), and whether the bytes are the same.

    python -m bench.exp_workers [--model effnet] [--runs 1x1,1x2,2x1] [-- extra llc-onnx options]

Each run is ``llc-onnx optimize`` as a subprocess (``WxT`` = W workers × T threads per worker) on a bench model
(``bench.models``, prepared files in the cache) with the bench's batch size and measure samples, writing its
model to a temporary directory. Prints one JSON object: per run the wall time, the stage seconds of rank 0 (the
``candidates`` stage includes waiting for the slowest worker), the output's SHA-256, and the load average before
and after (other processes on the machine distort every timing: read it next to them); then the speed-up of the
candidate stage of each run over the first and whether each run's bytes equal the first run's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def _sha(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m bench.exp_workers", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="effnet")
    ap.add_argument("--runs", default="1x1,2x1", help="comma-separated WxT (workers x threads per worker)")
    a = ap.parse_args(argv)

    from bench import models

    m = models.get(a.model)[0]
    calib, held = m.files(False)
    out = {"model": a.model, "extra": extra, "cpus": len(os.sched_getaffinity(0)), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.runs.split(","):
            w, t = (int(x) for x in spec.split("x"))
            dst = os.path.join(tmp, f"{spec}.onnx")
            cmd = [sys.executable, "-m", "llc_onnx", "optimize", str(m.model_path()), "--data", str(calib), "--held",
                   str(held), "--batch-size", str(m.batch_size), "-o", dst, "--json", "--allow-loss-increase",
                   "--workers", str(w), "--threads", str(t), *extra]
            if m.measure_samples:
                cmd += ["--measure-samples", str(m.measure_samples)]
            env = {**os.environ, "OMP_NUM_THREADS": str(t)}
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            run = {"run": spec, "rc": proc.returncode, "wall_s": round(wall, 1), "load_before": load0,
                   "load_after": os.getloadavg(), "sha256": _sha(dst)}
            if proc.returncode in (0, 1):
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                run["seconds"] = {k: round(v, 1) for k, v in res["seconds"].items()}
                run["candidates"] = len(res["stages"][0]["candidates"])
            else:
                run["stderr"] = proc.stderr.strip().splitlines()[-3:]
            out["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    first = out["runs"][0]
    for r in out["runs"][1:]:
        if "seconds" in r and "seconds" in first:
            r["candidates_speedup"] = round(first["seconds"]["candidates"] / r["seconds"]["candidates"], 2)
        r["same_bytes_as_first"] = r["sha256"] is not None and r["sha256"] == first["sha256"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
