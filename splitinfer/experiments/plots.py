"""Figures for the experiments (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def save(fig, path: Path) -> Path:
    """Lay the figure out, write it as a PNG (creating the folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grouped_bars(path: Path, title: str, ylabel: str, groups: list[str], series: dict[str, list[float]]) -> Path:
    """One bar per series within each group (e.g. n-gram size within each category)."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


SHORT = {"sequential": "seq", "lookahead": "look", "jacobi": "jac", "lookahead-model-free": "free"}  # bar labels


def rtt_figure(path: Path, measured: dict, model, projections: list[float]) -> Path:
    """Left: tokens/s vs RTT, measured points and the fitted model.  Right: time shares per mode at each RTT."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = sorted(measured)
    rtts = sorted({float(r) for m in modes for r in measured[m]})
    grid = [x * max(rtts + projections) / 100 for x in range(101)]
    for mode in modes:
        xs = sorted(float(r) for r in measured[mode])
        left.plot(xs, [measured[mode][f"{x:g}"]["tokens_per_second"] for x in xs], "o", label=f"{mode} measured")
        left.plot(grid, [model.tokens_per_second(mode, x) for x in grid], "-", alpha=0.6, label=f"{mode} model")
    left.set_xlabel("round-trip time (ms)")
    left.set_ylabel("tokens / s")
    left.set_title("Throughput vs RTT")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    parts = ["network", "local", "cloud", "serialize", "other"]
    labels, bottoms = [], None
    bars = {p: [] for p in parts}
    for mode in modes:
        for x in rtts:
            labels.append(f"{SHORT.get(mode, mode[:4])}\n{x:g}")
            for p in parts:
                bars[p].append(measured[mode][f"{x:g}"]["shares"][p])
    bottoms = [0.0] * len(labels)
    for p in parts:
        right.bar(range(len(labels)), bars[p], bottom=bottoms, label=p)
        bottoms = [b + v for b, v in zip(bottoms, bars[p])]
    right.set_xticks(range(len(labels)), labels, fontsize=7)
    right.set_ylabel("share of step time")
    right.set_title("Latency breakdown (mode / RTT ms)")
    right.legend(fontsize=8, loc="lower right")
    return save(fig, path)
