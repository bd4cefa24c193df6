"""Loss-vs-size plot per model: every method that produced a model, held-out loss against weight bytes."""
from __future__ import annotations

from pathlib import Path

MARKERS = {"fp32": ("k", "*"), "ort": ("tab:gray", "s"), "hawq": ("tab:orange", "^"), "fisher": ("tab:purple", "v"),
           "svd": ("tab:brown", "D"), "llc": ("tab:blue", "o"), "llc-lr": ("tab:green", "o")}


def _family(key: str) -> str:
    if key == "fp32":
        return "fp32"
    if key.startswith("ort"):
        return "ort"
    if key.startswith("llc_lr") or key.startswith("llc_lowrank"):
        return "llc-lr"
    for f in ("hawq", "fisher", "svd", "llc"):
        if key.startswith(f):
            return f
    return "ort"


def loss_vs_size(model_name: str, title: str, rows: list[dict], out_dir: Path) -> Path | None:
    """rows: dicts with key, label, bytes, held_loss, verified. Writes <out_dir>/<model_name>_loss_vs_size.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("bytes") and r.get("held_loss") is not None]
    if not pts:
        return None
    fp = next((r for r in pts if r["key"] == "fp32"), None)
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    for r in pts:
        color, marker = MARKERS[_family(r["key"])]
        filled = r.get("verified") in (True, None)
        ax.scatter(r["bytes"] / 1024, r["held_loss"], s=60, marker=marker, edgecolors=color,
                   facecolors=color if filled else "none", linewidths=1.5, zorder=3)
        ax.annotate(r["label"], (r["bytes"] / 1024, r["held_loss"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    if fp:
        ax.axhline(fp["held_loss"], color="k", lw=0.8, ls="--", zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes of the compressible nodes (KiB, log scale)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{title}\nfilled = held-out loss ≤ FP32 (verified), hollow = not; dashed = FP32", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_name}_loss_vs_size.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
