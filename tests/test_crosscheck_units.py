"""The pieces of crosscheck on their own: the exact comparison, JSON encoding, the progress bar, the error
statistics, the figures and the torch side's refusal of an engine (in-process, quick)."""

from __future__ import annotations

import io
import json
import math
import re
import time

import numpy as np
import pytest

from crosscheck import compare as C
from crosscheck.progress import Progress
from crosscheck.study import ErrorStats, StudyConfig, _flip_lsb, _Perturber, inside_ranges


# ----------------------------------------------------------------------------------------------------------------
# compare


def test_floats_compare_by_bits_so_signed_zeros_differ():
    f = C.compare("z", np.float32(-0.0), np.float32(0.0))
    assert not f.equal and f.mismatches == 1
    assert f.first_mismatch["torch_bits"] == "0x80000000" and f.first_mismatch["refquant_bits"] == "0x00000000"


def test_nan_equals_only_the_same_nan():
    nan = np.array([np.nan], np.float32)
    other_nan = nan.view(np.uint32) | np.uint32(1)
    assert C.compare("n", nan, nan.copy()).equal
    assert not C.compare("n", nan, other_nan.view(np.float32)).equal


def test_float32_is_widened_exactly_against_float64():
    assert C.compare("s", np.float64(np.float32(0.1)), np.float32(0.1)).equal
    f = C.compare("s", np.float64(0.1), np.float32(0.1))  # 0.1 in float64 is not a float32 value
    assert not f.equal and f.first_mismatch["torch_bits"].startswith("0x3fb99999")


def test_integers_compare_by_value_across_widths_and_report_both_dtypes():
    f = C.compare("zp", np.array([64], np.int64), np.array([64], np.int32))
    assert f.equal and (f.torch_dtype, f.refquant_dtype) == ("int64", "int32")
    assert not C.compare("zp", np.array([64], np.int64), np.array([65], np.int32)).equal
    assert not C.compare("u", np.array([255], np.uint8), np.array([-1], np.int8)).equal  # values, not bytes


def test_float_against_integer_and_shape_differences_are_mismatches_with_a_reason():
    f = C.compare("mixed", np.array([1.0], np.float32), np.array([1], np.int32))
    assert not f.equal and "dtype float32 (torch) vs int32 (refquant)" in f.first_mismatch["reason"]
    f = C.compare("shape", np.zeros((2, 3), np.int8), np.zeros((3, 2), np.int8))
    assert not f.equal and f.mismatches == 6 and "shape (2, 3) (torch) vs (3, 2) (refquant)" in \
        f.first_mismatch["reason"]


def test_chunked_comparison_reports_the_global_first_index_and_counts(rng):
    t = rng.integers(0, 256, (10, 3, 4), dtype=np.uint8)
    r = t.copy()
    r[7, 2, 1] ^= 1
    r[9, 0, 0] ^= 4
    c = C.ArrayComparison("codes", keep_limit=10)
    for start in range(0, 10, 3):
        c.update(t[start:start + 3], r[start:start + 3])
    f = c.result()
    assert (f.equal, f.mismatches, f.size, f.shape) == (False, 2, 120, (10, 3, 4))
    assert f.first_mismatch["index"] == [7, 2, 1]
    assert f.first_mismatch["torch"] == int(t[7, 2, 1]) and f.first_mismatch["refquant"] == int(r[7, 2, 1])
    j = f.to_json()  # too large to keep: the JSON holds shape, dtype and hashes, which differ
    assert j["torch"]["sha256"] != j["refquant"]["sha256"] and j["torch"]["shape"] == [10, 3, 4]


def test_equal_large_arrays_have_equal_hashes_in_the_json(rng):
    t = rng.standard_normal((600,)).astype(np.float32)
    f = C.compare("big", t, t.copy())
    j = f.to_json()
    assert f.equal and j["torch"] == j["refquant"] and j["torch"]["first"] == [float(v) for v in t[:8]]


def test_json_values_are_exact_and_non_finite_floats_are_strings():
    v = np.array([0.1, np.inf, -np.inf, np.nan], np.float32)
    out = C.array_to_json(v)
    assert out[1:] == ["inf", "-inf", "nan"]
    assert np.float32(out[0]) == v[0] and float(np.float32(out[0])) == out[0]  # round-trips exactly
    json.dumps(out, allow_nan=False)


def test_refquant_only_rows_are_not_counted():
    f = C.refquant_only("m", np.array([0.5], np.float32), "note")
    assert f.equal is None and f.torch is None and not f.counted
    assert C.compare("x", 1, 1, kind=C.FLOAT_FORWARD).counted is False


def test_flip_lsb_changes_exactly_one_bit():
    a = np.array([1.0, 2.0], np.float32)
    b = _flip_lsb(a, 1)
    assert b[0] == a[0] and b[1] == np.nextafter(np.float32(2.0), np.float32(3.0)) and a[1] == 2.0
    assert _flip_lsb(np.array([64], np.int64), 0)[0] == 65
    assert _flip_lsb(np.array([255], np.uint8), 0)[0] == 254


def test_perturber_counts_flat_indices_across_chunks():
    p = _Perturber(("codes", 5))
    first = p("codes", np.zeros(4, np.int32))
    second = p("codes", np.zeros(4, np.int32))
    assert not first.any() and second.tolist() == [0, 1, 0, 0]
    assert p("other", np.zeros(4, np.int32)).sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# error statistics


def test_error_stats_formulas_on_a_hand_example():
    s = ErrorStats()
    yq = np.array([1.0, 2.0, 0.0, -1.0], np.float32)
    yf = np.array([1.5, 2.0, 0.25, -1.0], np.float32)
    s.update(yq, yf, np.array([True, True, False, True]))
    r = s.result()
    assert r["n"] == 4 and r["mean_abs"] == 0.75 / 4 and r["max_abs"] == 0.5
    assert r["sqnr_db"] == 10 * math.log10((1.5**2 + 4 + 0.0625 + 1) / (0.25 + 0.0625))
    assert r["inside_ranges"]["n"] == 3 and r["clipped"]["n"] == 1 and r["clipped"]["max_abs"] == 0.25
    assert r["clipped"]["share_of_squared_error"] == 0.0625 / 0.3125


def test_error_stats_zero_error_gives_infinite_sqnr():
    s = ErrorStats()
    s.update(np.ones(3, np.float32), np.ones(3, np.float32), np.ones(3, bool))
    assert s.result()["sqnr_db"] == math.inf


def test_inside_ranges_uses_every_input_of_the_row_and_the_output():
    qp_in = (0.1, 10, 0, 255)  # representable [-1.0, 24.5] (+- half a step)
    qp_out = (0.5, 0, 0, 255)  # [0, 127.5]
    x = np.array([[0.0, 1.0], [-1.2, 0.0], [0.0, 24.5]], np.float32)
    y = np.array([[1.0, -0.3], [1.0, 1.0], [1.0, 200.0]], np.float32)
    assert inside_ranges(x, y, qp_in, qp_out).tolist() == [[True, False], [False, False], [True, False]]


# ----------------------------------------------------------------------------------------------------------------
# progress bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_line_redrawn_in_place():
    tty = _Tty()
    with Progress("samples", 10, stream=tty, delay_s=0) as bar:
        time.sleep(0.05)  # the timer announces the phase
        bar.advance(10)
    out = tty.getvalue()
    assert out.startswith("\rcrosscheck: samples [") and "10/10" in out and out.endswith(", done\n")
    assert out.count("\n") == 1


def test_progress_off_a_terminal_is_one_plain_line_per_phase():
    plain = io.StringIO()
    with Progress("samples", 10, stream=plain, delay_s=0) as bar:
        time.sleep(0.05)
        bar.advance(4)
        bar.advance(6)
    with Progress("torch: import, prepare, calibrate, convert", stream=plain, delay_s=0):
        time.sleep(0.05)
    lines = plain.getvalue().split("\n")
    assert "\r" not in plain.getvalue() and lines[-1] == "" and len(lines) == 3
    assert re.fullmatch(r"crosscheck: samples \.\.\. 10/10 in \d+\.\d s", lines[0]), lines[0]
    assert re.fullmatch(r"crosscheck: torch: import, prepare, calibrate, convert \.\.\. done in \d+\.\d s", lines[1])


def test_progress_of_a_quick_or_disabled_phase_prints_nothing():
    for stream in (_Tty(), io.StringIO()):
        with Progress("quick", 10, stream=stream, delay_s=5) as bar:
            bar.advance(10)
        with Progress("disabled", stream=stream, delay_s=0, enabled=False):
            time.sleep(0.05)
        assert stream.getvalue() == ""


def test_progress_announces_a_phase_that_blocks():
    """A phase that never advances (Numba compiling, waiting for torch) is announced by the timer while it runs."""
    plain = io.StringIO()
    with Progress("compiling", stream=plain, delay_s=0.05):
        time.sleep(0.3)
        assert plain.getvalue() == "crosscheck: compiling ..."  # written while the phase still runs
    assert plain.getvalue().startswith("crosscheck: compiling ... done in 0.")


# ----------------------------------------------------------------------------------------------------------------
# the torch side refuses what torch refuses


@pytest.mark.parametrize("torch_subprocess", [False, True])
def test_unsupported_engine_is_a_usage_error(torch_subprocess):
    from crosscheck.study import run_study
    from crosscheck.worker import UsageError

    with pytest.raises(UsageError, match="engine 'no-such-engine' is not supported by this torch build"):
        run_study(StudyConfig(engine="no-such-engine", samples=1), torch_subprocess=torch_subprocess)


# ----------------------------------------------------------------------------------------------------------------
# figures


def test_plots_are_written(tmp_path):
    from crosscheck.plots import FIGURES, draw_all
    from crosscheck.study import run_study

    res = run_study(StudyConfig(samples=50, relu=True), plot_data=True, torch_subprocess=False)
    paths = draw_all(res, str(tmp_path / "figs"))
    assert [p.rsplit("/", 1)[1] for p in paths] == [name for name, _ in FIGURES]
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert 400 <= width <= 1200 and 300 <= height <= 900, (p, width, height)


def test_a_failing_torch_worker_is_reported_with_its_traceback():
    from crosscheck.study import run_study
    from crosscheck.worker import TorchSideError

    with pytest.raises(TorchSideError, match="(?s)the torch side failed:.*dist must be one of"):
        run_study(StudyConfig(calib_dist="no-such-distribution", samples=1), torch_subprocess=True)


def test_main_exits_3_when_the_study_cannot_run(monkeypatch, capsys):
    import crosscheck.study
    from crosscheck.linear import main
    from crosscheck.worker import TorchSideError

    def fail(*args, **kwargs):
        raise TorchSideError("the torch worker process exited unexpectedly (exit code -11)")

    monkeypatch.setattr(crosscheck.study, "run_study", fail)
    assert main(["--samples", "1"]) == 3
    assert "the study could not run: the torch worker process exited unexpectedly" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the same seed gives the same data with and without a bias


def test_no_bias_keeps_the_weight_calibration_data_and_samples_of_the_seed():
    """nn.Linear's bias initialisation draws from torch's generator, after the weight and before the data: the
    torch side always draws it (then removes it), so --no-bias changes nothing but the bias."""
    from crosscheck.torch_study import torch_events

    def drawn(bias: bool) -> tuple:
        config = StudyConfig(in_features=5, out_features=4, input_shape=(64, 5), calib_batches=2, samples=500,
                             seed=1234, bias=bias)  # 204 samples per chunk: 3 chunks
        events = list(torch_events(config))
        record = next(p for k, p in events if k == "model")
        batches = [p for k, p in events if k == "batch"]
        return (record, [b.x for b in batches if b.set == "calibration"],
                [b.x for b in batches if b.set == "evaluation"])

    with_bias, calib_b, samples_b = drawn(True)
    without, calib_n, samples_n = drawn(False)
    fc_b, fc_n = with_bias.float_model.modules["fc"], without.float_model.modules["fc"]
    assert fc_b.bias is not None and fc_n.bias is None and without.converted["fc"]["bias"] is None
    np.testing.assert_array_equal(fc_n.weight, fc_b.weight, strict=True)
    assert len(calib_n) == len(calib_b) == 2 and len(samples_n) == len(samples_b) > 1  # several sample chunks
    for a, b in zip(calib_n + samples_n, calib_b + samples_b):
        np.testing.assert_array_equal(a, b, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# the kernel family: an in-process torch that cannot honour --isa refuses


def test_in_process_torch_refuses_an_isa_it_does_not_run(fbgemm_kernel):
    """torch is loaded in this process, and fbgemm fixed its kernel family at the first quantized op: a study forced
    to run here with the other family is a usage error naming both, never a silent run on the wrong kernels."""
    from crosscheck.study import run_study
    from crosscheck.worker import UsageError

    other = "avx2" if fbgemm_kernel == "vnni" else "vnni"
    with pytest.raises(UsageError, match=f"--isa {other}: torch's fbgemm runs its {fbgemm_kernel} kernels in "
                                         r"this process \(torch already imported\) and cannot switch"):
        run_study(StudyConfig(isa=other, samples=1), torch_subprocess=False)
    res = run_study(StudyConfig(isa=fbgemm_kernel, samples=1), torch_subprocess=False)  # the family it runs: fine
    assert res.equal and res.environment["fbgemm_kernel"] == fbgemm_kernel


# ----------------------------------------------------------------------------------------------------------------
# the collector paused for the large imports (crosscheck.worker.collector_paused)


@pytest.mark.parametrize("enabled_before", [True, False])
def test_collector_paused_restores_the_collector_state_even_on_error(enabled_before):
    import gc

    from crosscheck.worker import collector_paused

    was = gc.isenabled()
    try:
        (gc.enable if enabled_before else gc.disable)()
        with collector_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled_before
        with pytest.raises(RuntimeError, match="inside"):
            with collector_paused():
                raise RuntimeError("inside")
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()


def test_collector_paused_with_freeze_moves_the_live_objects_to_the_permanent_generation():
    import gc

    from crosscheck.worker import collector_paused

    before = gc.get_freeze_count()
    try:
        kept = [[i] for i in range(1000)]  # container objects: tracked by the collector
        with collector_paused(freeze=True):
            pass
        assert gc.get_freeze_count() >= before + len(kept)
        assert gc.isenabled()
    finally:
        gc.unfreeze()  # this pytest process goes on: let the collector see them again
