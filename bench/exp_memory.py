"""Peak resident memory (RSS) of an ``optimize`` run, per stage: where a large model's memory goes.

    python -m bench.exp_memory [--model smollm2] [--set quant.bits=4,float ...] [--out mem.json]

Runs ``llc_onnx.optimize`` on a bench model (``bench.models``: the prepared files in the cache) with the bench's
batch size and measure samples, samples this process's RSS (``/proc/self/status`` VmRSS) every 20 ms, and
attributes each sample to the stage running then (``progress.StageTimer`` names: load, baseline, gradients,
candidates, validate, ...), and reads the kernel's exact high-water mark at every stage boundary (VmHWM, reset
after each read: ``exact_peaks_GB``, to the innermost stage running; "start" is before the first stage and
between stages; ``peak_GB`` their maximum — the resets also reset what ``ru_maxrss`` reports, which then covers
only the last interval). The samples miss what happens while a C call holds the GIL; the high-water marks do not. Prints one JSON object: wall time, ``ru_maxrss`` (the kernel's peak), the peak and
the RSS at entry/exit of every stage. Extra settings: ``--set section.field=value`` (parsed like the CLI flag).
With ``device.workers > 1`` only this process (rank 0) is measured; each worker holds its own replica.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import threading
import time


from llc_onnx.memory import high_water, reset_high_water, rss


def _values(pairs: list[str]) -> dict:
    from llc_onnx.config import cli_fields

    fields = {f.path: f for f in cli_fields()}
    out = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        f = fields[key]
        if f.parse is not None:
            out[key] = f.parse(text)
        elif isinstance(f.default, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(f.default, int) or key.endswith(("threads", "workers", "batch_size", "measure_samples")):
            out[key] = int(text)
        elif isinstance(f.default, float) or key.endswith(("budget", "avg_bits")):
            out[key] = float(text)
        else:
            out[key] = text
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.exp_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)

    from bench import models
    from llc_onnx import api, progress
    from llc_onnx.config import OptimizeConfig, with_values

    m = models.get(a.model)[0]
    calib, held = m.files(False)
    values = {"data.batch_size": m.batch_size, "criterion.allow_loss_increase": True}
    if m.measure_samples:
        values["data.measure_samples"] = m.measure_samples
    values.update(_values(a.set))
    cfg = with_values(OptimizeConfig(), values)

    state = {"stage": "start", "peaks": {}, "exact": {}, "log": []}
    t0 = time.time()
    exact_ok = reset_high_water()

    def boundary():
        """The exact peak of the interval that ends now, to the (innermost) stage that ran in it."""
        if exact_ok:
            s = state["stage"]
            state["exact"][s] = max(state["exact"].get(s, 0), high_water())
            reset_high_water()

    def sampler():
        while True:
            r, s = rss(), state["stage"]
            state["peaks"][s] = max(state["peaks"].get(s, 0), r)
            time.sleep(0.02)

    threading.Thread(target=sampler, daemon=True).start()
    orig = progress.StageTimer.stage

    @contextlib.contextmanager
    def stage(self, name):
        boundary()
        prev, state["stage"] = state["stage"], name
        state["log"].append([name, "in", round(rss() / 1e9, 3), round(time.time() - t0, 1)])
        print(f"[exp_memory] {time.time() - t0:7.1f} s  {name:<20} in   {rss() / 1e9:.2f} GB", file=sys.stderr,
              flush=True)
        try:
            with orig(self, name):
                yield
        finally:
            boundary()
            state["log"].append([name, "out", round(rss() / 1e9, 3), round(time.time() - t0, 1)])
            print(f"[exp_memory] {time.time() - t0:7.1f} s  {name:<20} out  {rss() / 1e9:.2f} GB (peak "
                  f"{state['peaks'].get(name, 0) / 1e9:.2f}, exact {state['exact'].get(name, 0) / 1e9:.2f})",
                  file=sys.stderr, flush=True)
            state["stage"] = prev

    progress.StageTimer.stage = stage
    res = api.optimize(str(m.model_path()), str(calib), cfg, held=str(held))
    state["stage"] = "after"
    boundary()
    info = {"model": a.model, "wall_s": round(time.time() - t0, 1), "verified": res.verified,
            "ru_maxrss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
            "peaks_GB": {k: round(v / 1e9, 3) for k, v in state["peaks"].items()},
            "exact_peaks_GB": {k: round(v / 1e9, 3) for k, v in state["exact"].items()} if exact_ok else None,
            # the run's peak: resetting VmHWM also resets what ru_maxrss reports, so with exact peaks this is theirs
            "peak_GB": round(max(state["exact"].values()) / 1e9, 3) if exact_ok and state["exact"] else None,
            "stages": state["log"],
            "seconds": {k: round(v, 1) for k, v in res.seconds.items()},
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}
    text = json.dumps(info, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
