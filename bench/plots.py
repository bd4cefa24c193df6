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
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(pts):
        fam = _family(r["key"])
        color = "k" if fam == "fp32" else colors[i % len(colors)]
        marker = MARKERS[fam][1]
        filled = r.get("verified") in (True, None)
        ax.scatter(r["bytes"] / 1024, r["held_loss"], s=70 if filled else 60, marker=marker, edgecolors=color,
                   facecolors=color if filled else "none", linewidths=1.6, zorder=3,
                   label=f"{r['label']}{'' if filled else ' (not verified)'}")
        if r.get("round0"):  # llc budget runs: the knapsack solution before held-out back-off
            b0, l0 = r["round0"]
            ax.scatter(b0 / 1024, l0, s=40, marker="x", color=color, zorder=3,
                       label=f"{r['label']}: before back-off")
    if fp:
        ax.axhline(fp["held_loss"], color="k", lw=0.8, ls="--", zorder=1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes of the compressible nodes (KiB, log scale)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{title}\nfilled = held-out loss ≤ FP32 (verified), hollow = not; dashed line = FP32", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_name}_loss_vs_size.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
