"""Loss-vs-size plot per model: every method that produced a model, test loss against weight bytes."""
from __future__ import annotations

from pathlib import Path

MARKERS = {"fp32": "*", "ort": "s", "llc": "o", "alloc": "^", "round": "v", "series": "D", "lowrank": "P",
           "svd": "X"}


def loss_vs_size(model_name: str, title: str, rows: list[dict], out_dir: Path) -> Path | None:
    """rows: dicts with key, label, family, bytes, test_loss, verified. Writes <out_dir>/<model_name>_loss_vs_size.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("bytes") and r.get("test_loss") is not None]
    if not pts:
        return None
    fp = next((r for r in pts if r["key"] == "fp32"), None)
    fig, ax = plt.subplots(figsize=(11, max(5.2, 0.17 * len(pts) + 1.2)), dpi=100)  # room for the legend
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(pts):
        fam = r.get("family", "llc")
        color = "k" if fam == "fp32" else colors[i % len(colors)]
        marker = MARKERS.get(fam, "o")
        filled = r.get("verified") in (True, None)
        ax.scatter(r["bytes"] / 1024, r["test_loss"], s=70 if filled else 60, marker=marker, edgecolors=color,
                   facecolors=color if filled else "none", linewidths=1.6, zorder=3,
                   label=f"{r['label']}{'' if filled else ' (not verified)'}")
    off = 0
    if fp:
        ax.axhline(fp["test_loss"], color="k", lw=0.8, ls="--", zorder=1)
        cap = 1.5 * fp["test_loss"]  # rows that break the model would squash the interesting range
        inside = [r["test_loss"] for r in pts if r["test_loss"] <= cap]
        off = len(pts) - len(inside)
        if off:
            lo, hi = min(inside), max(inside)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes of the compressible nodes (KiB, log scale)")
    ax.set_ylabel("test loss")
    ax.set_title(f"{title}\nfilled = VERIFIED, hollow = not; dashed line = FP32"
                 + (f"; {off} row(s) above 1.5× FP32's loss not shown" if off else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model_name}_loss_vs_size.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
