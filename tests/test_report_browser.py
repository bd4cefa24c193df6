"""The HTML report as a person sees it: opened in headless Chromium (Debian's ``chromium`` package), the
rendered page has the verdict heading, real tables with a row per split, plan and node, and plots that load;
the screenshot is not blank. Skipped where Chromium is not installed."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llc_onnx.cli import main
from llc_onnx.report_files import CAPTIONS, write_report

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "fashion_cnn.onnx"
DATA = REPO / "examples" / "fashion_data.npz"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium)")

# Runs in the page after it has loaded and writes what rendered into the DOM, for --dump-dom to print.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };
  const out = {
    h1: document.querySelector("h1").innerText,
    h1_color: getComputedStyle(document.querySelector("h1")).color,
    title: document.title,
    images: [...document.images].map((i) => ({alt: i.alt, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
                                           shown: box(i)})),
    captions: [...document.querySelectorAll("figcaption")].map((c) => c.innerText),
    tables: [...document.querySelectorAll("section")].map((s) => ({
      id: s.id, heading: s.querySelector("h2").innerText, display: getComputedStyle(s.querySelector("table")).display,
      shown: box(s.querySelector("table")),
      header: [...s.querySelectorAll("thead th")].map((c) => c.innerText),
      rows: [...s.querySelectorAll("tbody tr")].map((r) => [...r.cells].map((c) => c.innerText)),
      right_aligned: [...s.querySelectorAll("tbody td")].filter((c) => getComputedStyle(c).textAlign === "right")
                       .map((c) => c.innerText)})),
    text: document.body.innerText,
  };
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def rendered(page: Path, tmp: Path) -> dict:
    """What Chromium renders of ``page`` (the probe above, run after the load event)."""
    probe = tmp / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    p = _chromium(["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], tmp)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', p.stdout, re.S)
    assert m, f"no render probe in the DOM (rc {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["optimize", str(MODEL), "--data", str(DATA), "-o", str(d / "m.onnx"), "--budget", "0.3",
                   "--tolerance", "0.01", "--measure-samples", "200", "--report", str(d / "rep"), "--json"])
    assert rc == 0, err.getvalue()
    return d, json.loads(out.getvalue())


def test_report_renders_verdict_tables_and_plots(report, tmp_path):
    d, r = report
    page = rendered(d / "rep" / "report.html", tmp_path)
    assert page["h1"] == "llc-onnx quant: VERIFIED" and page["title"] == page["h1"]
    assert page["h1_color"] == "rgb(23, 109, 23)"                               # green
    tables = {t["heading"]: t for t in page["tables"]}

    splits = tables["Splits: which data did what"]
    assert page["tables"][0] is not None and page["tables"][0]["heading"] == splits["heading"]  # right under the verdict
    assert splits["display"] == "table" and splits["shown"][0] > 300 and splits["shown"][1] > 40
    assert [row[0] for row in splits["rows"]] == [f"{k} ({r['splits'][k]['n']})"
                                                 for k in ("calibration", "validation", "test")]
    test_row = splits["rows"][2]
    assert test_row[2] == f"{r['splits']['test']['reference']['loss']:.6f}"
    assert test_row[3] == f"{r['splits']['test']['compressed']['loss']:.6f}"
    assert test_row[2] in splits["right_aligned"] and "verdict" not in splits["right_aligned"]

    stage = r["stages"][0]
    plans = tables["quant: plans measured jointly on the validation split"]
    assert len(plans["rows"]) == len(stage["plans"]) >= 1
    assert sum(row[0].endswith("(chosen)") for row in plans["rows"]) == 1
    nodes = tables["quant: nodes"]
    assert nodes["header"][:4] == ["node", "op", "shape", "level"]
    assert [(row[0], row[3]) for row in nodes["rows"]] == [(n["node"], n["level"]) for n in r["nodes"]]
    latency = next(t for h, t in tables.items() if h.startswith("Latency on ort-cpu"))
    assert sorted(row[0] for row in latency["rows"]) == sorted(r["target"]["latency"])
    assert all(t["display"] == "table" and t["rows"] for t in page["tables"])
    assert "| split" not in page["text"] and "|---" not in page["text"]          # no raw Markdown left

    assert [i["alt"] for i in page["images"]] == ["levels.png", "pred_vs_measured.png", "frontier.png"]
    for img in page["images"]:                                                   # decoded and laid out
        assert img["complete"] and img["natural"][0] > 200 and img["natural"][1] > 200, img
        assert img["shown"][0] > 200 and img["shown"][1] > 150, img
    assert page["captions"] == [CAPTIONS[i["alt"]] for i in page["images"]]


def test_report_screenshot_is_not_blank(report, tmp_path):
    d, _ = report
    shot = tmp_path / "report.png"
    p = _chromium([f"--screenshot={shot}", "--window-size=1300,2400", (d / "rep" / "report.html").as_uri()], tmp_path)
    assert shot.exists(), p.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(str(shot))[..., :3]
    assert px.shape[:2] == (2400, 1300)
    rgb = (px * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 50                                  # text, tables and plots, not a blank page
    top = px[:400]                                            # the verdict and the splits table are at the top
    assert (top < 0.5).any(axis=-1).mean() > 0.005
    green = (px[..., 1] > 0.35) & (px[..., 0] < 0.2) & (px[..., 2] < 0.2)   # the VERIFIED heading's colour
    assert green[:80].sum() > 200


def test_not_verified_heading(report, tmp_path):
    d, _ = report
    rep = json.loads((d / "rep" / "report.json").read_text())
    rep["verified"] = False
    write_report(rep, str(tmp_path / "rep"))
    page = rendered(tmp_path / "rep" / "report.html", tmp_path)
    assert page["h1"] == "llc-onnx quant: NOT VERIFIED" and page["h1_color"] == "rgb(176, 18, 18)"
    assert "status: NOT VERIFIED" in page["text"]
