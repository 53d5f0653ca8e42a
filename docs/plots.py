"""Draw docs/COMPARISON.md's figures: figure data (plain JSON, computed by docs/generate.py) in, SVG text out.

Apart from generate.py so that the page's arithmetic reads on its own and matplotlib is imported only when a
figure is drawn (never by --help or --check). Output is deterministic on one machine: Agg backend, text kept as
text, a fixed SVG hash salt, no date; the data's hash goes into the SVG's description for --check.

    python docs/generate.py     # draws these into docs/figures/
"""
from __future__ import annotations

import io

import common  # docs/generate.py puts the repository root on sys.path


def draw_quality(plt, data):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = {m: "osD^v"[i % 5] for i, m in enumerate(sorted({p["machine"] for p in data["points"]}))}
    for ax, key, xlabel, on in ((axes[0], "memory_gib", "peak memory of the run (GiB; RSS on CPU, VRAM on GPU)",
                                 set(data["frontier_memory"])),
                                (axes[1], "decode_tok_per_sec", "decode speed (tok/s; compare within one machine)",
                                 {rid for rids in data["frontier_speed"].values() for rid in rids})):
        shown = [p for p in data["points"] if p[key]]
        for p in shown:
            error = [[p["mmlu"] - p["low"]], [p["high"] - p["mmlu"]]] if p["low"] is not None else None
            ax.errorbar(p[key], p["mmlu"] * 100, yerr=None if error is None else [[e[0] * 100] for e in error],
                        fmt=markers[p["machine"]], capsize=3, color="0.6" if p["at_chance"] else "C0",
                        mfc="white" if p["at_chance"] else "C0")
            right = p[key] > (min(q[key] for q in shown) + max(q[key] for q in shown)) / 2  # label inward: never clipped
            ax.annotate(f"{p['label']} [{p['rid']}]" + (" (at chance)" if p["at_chance"] else ""),
                        (p[key], p["mmlu"] * 100), textcoords="offset points", xytext=(-6 if right else 6, 4),
                        ha="right" if right else "left", fontsize=8)
        ax.axhline(data["chance"] * 100, color="C3", linestyle="--", linewidth=1, label="chance (25%)")
        best = sorted((p[key], p["mmlu"] * 100) for p in shown if p["rid"] in on)
        if best:
            ax.plot(*zip(*best), color="C2", linewidth=1.5, marker="o", markersize=13, mfc="none",
                    label="on the frontier (noise-aware)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MMLU micro accuracy, % (95% interval)")
        ax.margins(x=0.35, y=0.15)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Quality against memory and against decode speed")
    return fig


def draw_speculative(plt, data):
    panels = data["panels"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        methods = list(panel["methods"])
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = panel["methods"][method]
            ax.bar([x + i * width for x in range(len(values))], values, width, label=method, color=f"C{i}")
        ax.axhline(1.0, color="black", linewidth=1, label="1.0× = target alone")
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(panel["prompts"]))], panel["prompts"])
        ax.set_ylabel("speed-up ×")
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, ncol=3, loc="upper right")
        ax.set_ylim(0, max([1.2] + [v * 1.25 for vs in panel["methods"].values() for v in vs]))
    fig.tight_layout()
    return fig


def draw_acceptance(plt, data):
    panels = data["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ks, needed = zip(*panel["break_even"]) if panel["break_even"] else ((), ())
        ax.plot(ks, needed, color="black", label="break-even acceptance α")
        for i, (name, alpha) in enumerate(panel["alpha"]):
            ax.axhline(alpha, color=f"C{i}", linestyle=":", label=f"measured α, {name}")
        if panel["k"]:
            ax.axvline(panel["k"], color="0.7", linewidth=1, label=f"k used = {panel['k']}")
        ax.set_xlabel("draft tokens per step k")
        ax.set_ylabel("acceptance α")
        ax.set_ylim(0, 1)
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def draw_finetune(plt, data):
    fig, (loss, bars) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, run in enumerate(data["runs"]):
        loss.plot(range(1, len(run["loss"]) + 1), run["loss"], color=f"C{i}", label=f"{run['label']} [{run['rid']}]")
        for j, (x, n) in enumerate(run["counts"]):
            if isinstance(x, int) and isinstance(n, int) and 0 <= x <= n > 0:
                low, high = common.wilson_interval(x, n)
                bars.bar(i * 3 + j, x / n * 100, yerr=[[max(0, x / n - low) * 100], [max(0, high - x / n) * 100]], capsize=3,
                         color=f"C{i}", alpha=0.45 if j == 0 else 1.0)
    loss.set_yscale("log")
    loss.set_xlabel("training step")
    loss.set_ylabel("training loss (log scale)")
    loss.legend(fontsize=8)
    bars.set_xticks([i * 3 + j for i in range(len(data["runs"])) for j in (0, 1)],
                    [f"{run['rid']} {when}" for run in data["runs"] for when in ("before", "after")], fontsize=8)
    bars.set_ylabel("held-out exact match, % (95% interval)")
    bars.set_ylim(0, 105)
    fig.suptitle("Fine-tuning: loss per step, and held-out exact match before and after LoRA")
    fig.tight_layout()
    return fig


DRAWERS = {"quality": draw_quality, "speculative": draw_speculative, "acceptance": draw_acceptance,
           "finetune": draw_finetune}


def render_svg(name: str, data, digest: str) -> str:
    """One figure as SVG: Agg backend, text kept as text, fixed hash salt and no date, so reruns match."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with plt.rc_context({"svg.hashsalt": "billion-llm", "svg.fonttype": "none", "font.size": 9}):
        fig = DRAWERS[name](plt, data)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None,
                                                    "Description": f"billion-llm figure data {digest}"})
        plt.close(fig)
    return buffer.getvalue()
