"""``bench.llc.run``: a run past ``--llc-timeout`` gets SIGTERM first (so llc-onnx removes its temporary files),
and SIGKILL only when it does not stop within the grace period."""

import sys

from bench import llc

_TRAPS_TERM = """
import pathlib, signal, sys, time
def on_term(*_):
    pathlib.Path(sys.argv[1]).write_text("terminated")
    raise SystemExit(143)
signal.signal(signal.SIGTERM, on_term)
time.sleep(60)
"""

_IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
"""


def test_a_timed_out_run_is_terminated_before_it_is_killed(tmp_path):
    mark = tmp_path / "mark"
    res = llc.run([sys.executable, "-c", _TRAPS_TERM, str(mark)], tmp_path / "r.json", timeout=8)
    assert res["exit"] == "timeout" and "--llc-timeout" in res["error"]
    assert mark.read_text() == "terminated"  # it saw SIGTERM and could clean up
    assert not (tmp_path / "r.json").exists()


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(llc, "TERMINATE_GRACE_S", 1)
    t0 = time.perf_counter()
    res = llc.run([sys.executable, "-c", _IGNORES_TERM, "x"], tmp_path / "r.json", timeout=8)
    assert res["exit"] == "timeout" and time.perf_counter() - t0 < 40


def test_a_model_scoped_method_prefix_selects_rows_for_that_model_only():
    from bench import rows

    spec = "ort_int8,smollm2:llc_cpu_w8_lat60_bb,fmnist:llc_cpu_c8p_lat66_bb"
    smol = [m.key for m in rows.selected(spec, "smollm2")]
    fm = [m.key for m in rows.selected(spec, "fmnist")]
    assert smol == ["fp32", "ort_int8", "llc_cpu_w8_lat60_bb"]
    assert fm == ["fp32", "ort_int8", "llc_cpu_c8p_lat66_bb"]
    assert [m.key for m in rows.selected(spec, "effnet")] == ["fp32", "ort_int8"]


def test_a_method_scope_naming_no_bench_model_is_a_usage_error(capsys):
    import pytest

    from bench import run

    with pytest.raises(SystemExit) as exc:
        run.main(["--methods", "effnt:llc_cpu_lat50", "--out", "/nonexistent/x.md"])
    assert exc.value.code == 2
    assert "no bench model 'effnt'" in capsys.readouterr().err
