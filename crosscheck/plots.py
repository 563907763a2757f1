"""Figures of a study (``--plots DIR``); matplotlib is imported only here.

    calibration_histogram.png  what each activation observer saw, its chosen clip range and the quantization grid
    float_vs_quantized.png     quantized model output against float model output, over the samples
    error_histogram.png        quantized minus float output over the samples: rounding inside, clipping outside
    weight_int8.png            the int8 weight matrix (int_repr) with its per-channel scales
"""

from __future__ import annotations

import os

import numpy as np

from .study import StudyResult

FIGSIZE = (8.0, 4.2)
DPI = 100


def _grid_values(scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    return float(scale) * (np.arange(qmin, qmax + 1, dtype=np.float64) - zero_point)


def _calibration_histogram(res: StudyResult, path: str, plt) -> None:
    ts = res.torch
    fig, axes = plt.subplots(2, 1, figsize=(FIGSIZE[0], FIGSIZE[1] * 1.45))
    panels = (("input (QuantStub observer)", ts.input_observer, float(ts.input_scale[0]), int(ts.input_zero_point[0])),
              ("output (Linear observer)", ts.output_observer, float(ts.output_scale), int(ts.output_zero_point)))
    for ax, (title, obs, scale, zp) in zip(axes, panels):
        hist = np.asarray(obs["histogram"], np.float64)
        lo, hi = float(obs["min_val"]), float(obs["max_val"])
        edges = np.linspace(lo, hi, hist.size + 1)
        centers = 0.5 * (edges[:-1] + edges[1:])
        nz = hist > 0
        clip_lo, clip_hi = float(obs["clip_min"]), float(obs["clip_max"])
        span = hi - lo if hi > lo else 1.0
        x0, x1 = lo - 0.08 * span, hi + 0.08 * span
        ax.axvspan(clip_lo, clip_hi, color="tab:green", alpha=0.12,
                   label=f"clip range chosen: [{np.float32(clip_lo)!s}, {np.float32(clip_hi)!s}]")
        grid = _grid_values(scale, zp, obs["quant_min"], obs["quant_max"])
        grid_hi = _grid_values(scale, zp, obs["quant_max"] + 1, 255)
        ymax = hist.max() if hist.size and hist.max() > 0 else 1.0
        ax.vlines(grid[(grid >= x0) & (grid <= x1)], 0, ymax * 0.08, color="0.35", lw=0.6,
                  label=f"grid: scale*(q - {zp}), q = {obs['quant_min']}..{obs['quant_max']}")
        extra = grid_hi[(grid_hi >= x0) & (grid_hi <= x1)]
        if extra.size:
            ax.vlines(extra, 0, ymax * 0.08, color="0.75", lw=0.6, label="q = 128..255 (beyond reduce_range)")
        width = (edges[1] - edges[0]) if hist.size > 1 else span / 50
        ax.bar(centers[nz], hist[nz], width=max(width, span / 400), color="tab:blue",
               label=f"histogram ({hist.size} bins over [min_val, max_val], {int(hist.sum())} counts)")
        ax.set_xlim(x0, x1)
        ax.set_title(f"{title}: scale {np.float32(scale)!s}, zero_point {zp}", fontsize=10)
        ax.set_ylabel("count")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("float value")
    fig.suptitle("Calibration: what the HistogramObservers saw", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _float_vs_quantized(res: StudyResult, path: str, plt) -> None:
    ts, pd = res.torch, res.plot_data
    yf, yq, inside = pd["scatter_float"], pd["scatter_quantized"], pd["scatter_inside"]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    s, zp = float(ts.output_scale), int(ts.output_zero_point)
    lo_code = zp if res.config.relu else 0
    lo, hi = s * (lo_code - zp), s * (255 - zp)
    ax.axhspan(lo, hi, color="tab:green", alpha=0.08, label=f"representable: scale*(q - {zp}), q = {lo_code}..255")
    if yf.size:
        ax.scatter(yf[~inside], yq[~inside], s=2, alpha=0.5, color="tab:orange",
                   label=f"an input or the output clipped ({int((~inside).sum())})")
        ax.scatter(yf[inside], yq[inside], s=2, alpha=0.35, color="tab:blue",
                   label=f"sample outputs inside the quantized ranges ({int(inside.sum())})")
        a, b = float(min(yf.min(), yq.min())), float(max(yf.max(), yq.max()))
        ax.plot([a, b], [a, b], color="0.3", lw=0.8, label="quantized = float")
    c = res.calibration
    if c is not None:
        ax.scatter(c["float_output"].reshape(-1), c["quantized_output"].reshape(-1), s=18, color="tab:red",
                   marker="x", label="calibration input")
    ax.set_xlabel("float model output")
    ax.set_ylabel("quantized model output (dequantized)")
    ax.set_title(f"Float vs quantized outputs (output scale {np.float32(s)!s}, zero_point {zp})", fontsize=10)
    legend = ax.legend(fontsize=8, loc="upper left")
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        if text.get_text().startswith(("sample outputs", "an input")):  # the two clouds: bigger dots in the legend
            handle.set_sizes([20])
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _error_histogram(res: StudyResult, path: str, plt) -> None:
    ts, pd = res.torch, res.plot_data
    errors, inside = pd["errors"]
    fig, (ax, ax_in) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.25, FIGSIZE[1]),
                                    gridspec_kw={"width_ratios": [3, 2]})
    s = float(ts.output_scale)
    m = res.error["torch"]
    if errors.size:
        lim = float(np.abs(errors).max()) or s
        bins = np.linspace(-lim, lim, 121)
        ax.hist([errors[inside], errors[~inside]], bins=bins, stacked=True, color=["tab:blue", "tab:orange"],
                label=[f"inside the quantized ranges ({int(inside.sum())})",
                       f"an input or the output clipped ({int((~inside).sum())})"])
        ax.set_yscale("log")
        e_in = errors[inside]
        if e_in.size:
            lim_in = max(float(np.abs(e_in).max()), s)
            ax_in.hist(e_in, bins=np.linspace(-lim_in, lim_in, 61), color="tab:blue")
    for a in (ax, ax_in):
        a.axvline(-s / 2, color="0.3", lw=0.8, ls="--")
        a.axvline(s / 2, color="0.3", lw=0.8, ls="--", label=f"+-scale/2 = +-{s / 2:.4g}")
    ax.set_xlabel("quantized output - float output")
    ax.set_ylabel("outputs (log scale)")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"All {m['n']} outputs of {res.config.samples} random inputs:\nmean |err| {m['mean_abs']:.4g}, "
                 f"max {m['max_abs']:.4g}, SQNR {m['sqnr_db']:.1f} dB", fontsize=10)
    ins = m["inside_ranges"]
    ax_in.set_title(f"Inside the ranges only (rounding):\nmean |err| {ins['mean_abs']:.4g}, "
                    f"max {ins['max_abs']:.4g}", fontsize=10)
    ax_in.set_xlabel("quantized output - float output")
    ax_in.set_ylabel("outputs")
    ax_in.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _weight_int8(res: StudyResult, path: str, plt) -> None:
    ts = res.torch
    w8, scales = ts.weight_int8, np.asarray(ts.weight_scales)
    N, K = w8.shape
    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=FIGSIZE, gridspec_kw={"width_ratios": [3, 1.2]})
    im = ax.imshow(w8, cmap="RdBu_r", vmin=-128, vmax=127, aspect="auto", interpolation="nearest")
    if N * K <= 64:
        for n in range(N):
            for k in range(K):
                ax.text(k, n, f"{int(w8[n, k])}\n({ts.weight[n, k]:.3f})", ha="center", va="center", fontsize=9,
                        color="white" if abs(int(w8[n, k])) > 70 else "black")
    ax.set_xlabel("input feature k")
    ax.set_ylabel("output channel n")
    ax.set_title("int8 weight = int_repr() (float weight)", fontsize=10)
    if N <= 16:
        ax.set_yticks(range(N))
    if K <= 16:
        ax.set_xticks(range(K))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax_s.barh(np.arange(N), scales, color="tab:gray")
    ax_s.set_ylim(N - 0.5, -0.5)
    if N <= 16:
        ax_s.set_yticks(range(N))
        for n in range(N):
            ax_s.text(scales[n], n, f" {np.float32(scales[n])!s}", va="center", fontsize=8)
    ax_s.set_xlim(0, scales.max() * 1.9 if scales.size else 1)
    ax_s.set_title("per-channel scale\nmax|w[n]| / 127.5", fontsize=10)
    ax_s.tick_params(axis="x", labelsize=7)
    fig.suptitle("Weight: PerChannelMinMaxObserver(qint8, per_channel_symmetric), zero_point 0", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


FIGURES = (
    ("calibration_histogram.png", _calibration_histogram),
    ("float_vs_quantized.png", _float_vs_quantized),
    ("error_histogram.png", _error_histogram),
    ("weight_int8.png", _weight_int8),
)


def draw_all(res: StudyResult, directory: str) -> list[str]:
    """Write the four figures into ``directory`` (created if needed); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, draw in FIGURES:
        path = os.path.join(directory, name)
        draw(res, path, plt)
        paths.append(path)
    return paths
