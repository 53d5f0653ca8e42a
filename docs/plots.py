"""Draw docs/COMPARISON.md's figures: figure data (plain JSON, computed by docs/generate.py) in, SVG text out.

Apart from generate.py so that the page's arithmetic reads on its own and matplotlib is imported only when a
figure is drawn (never by --help or --check). Output is deterministic on one machine: Agg backend, text kept as
text, a fixed SVG hash salt, no date; the data's hash goes into the SVG's description for --check.

    python docs/generate.py     # draws these into docs/figures/
"""
from __future__ import annotations

import io
import math

import common  # docs/generate.py puts the repository root on sys.path
import guidance


# One colour per thing across every figure: a method keeps its colour in every panel, a model in every figure.
METHOD_COLOURS = {"target_only": "C7", "target_generate": "C5", "assisted": "C0", "ours": "C1", "ours_adaptive": "C3"}
PRECISION_MARKERS = {"bf16": "o", "8-bit": "s", "4-bit": "D"}
PRECISION_COLOURS = {"bf16": "C0", "8-bit": "C1", "4-bit": "C2"}
MODEL_PALETTE = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9")  # C3 (red) and C7 (grey) mark chance and frontier
PROMPT_PALETTE = ("C4", "C6", "C8", "C9")  # acceptance per prompt: none of the method colours


def model_colour(name: str) -> str:
    """A model's colour, the same in every figure: by its place in the registry (then by name)."""
    import models
    order = list(models.REGISTRY)
    index = order.index(name) if name in order else len(order) + sum(map(ord, name))
    return MODEL_PALETTE[index % len(MODEL_PALETTE)]


def legend_below(fig, axes, n_entries: int):
    """One legend under the axes, never over a point or an error bar."""
    handles, labels = axes.get_legend_handles_labels()
    ncol = min(3, max(1, n_entries))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = math.ceil(len(labels) / ncol)
    fig.subplots_adjust(bottom=0.14 + 0.045 * rows)


def draw_quality(plt, data):
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, key, xlabel, on in ((axes[0], "memory_gib", "peak memory of the run (GiB; RSS on CPU, VRAM on GPU)",
                                 set(data["frontier_memory"])),
                                (axes[1], "decode_tok_per_sec", "decode speed (tok/s; compare within one machine)",
                                 {rid for rids in data["frontier_speed"].values() for rid in rids})):
        shown = [p for p in data["points"] if p[key]]
        for p in shown:
            name, precision = p["label"].rsplit(" ", 1)
            error = [[max(0, p["mmlu"] - p["low"]) * 100], [max(0, p["high"] - p["mmlu"]) * 100]] \
                if p["low"] is not None and p["high"] is not None else None
            colour = model_colour(name)
            ax.errorbar(p[key], p["mmlu"] * 100, yerr=error, fmt=PRECISION_MARKERS.get(precision, "o"), capsize=3,
                        color=colour, mfc="white" if p["at_chance"] else colour,
                        label=f"{p['label']} [{p['rid']}]" + (" (hollow: at chance)" if p["at_chance"] else ""))
        ax.axhline(data["chance"] * 100, color="C3", linestyle="--", linewidth=1, label="chance (25%)")
        best = sorted((p[key], p["mmlu"] * 100) for p in shown if p["rid"] in on)
        if best:
            ax.plot(*zip(*best), color="C7", linewidth=1.5, marker="o", markersize=13, mfc="none",
                    label="frontier (noise-aware)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MMLU micro accuracy, % (95% interval)")
        ax.margins(x=0.2, y=0.15)
        ax.set_xlim(left=0)
    legend_below(fig, axes[0], len(data["points"]) + 2)
    fig.suptitle("Quality against memory and against decode speed")
    return fig


def draw_size(plt, data):
    """The size curve: MMLU, decode speed and peak memory against parameters, one colour per precision."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    panels = (("mmlu", "MMLU micro accuracy, % (95% interval)"), ("decode", "decode tok/s (this repo's CPU)"),
              ("memory_gib", "peak RAM of the run, GiB"))
    seen = set()
    for ax, (key, ylabel) in zip(axes, panels):
        for precision in PRECISION_MARKERS:
            points = sorted((p for p in data["points"] if p["precision"] == precision and p[key] is not None),
                            key=lambda p: p["params"])
            if not points:
                continue
            xs = [p["params"] / 1e9 for p in points]
            ys = [p[key] * (100 if key == "mmlu" else 1) for p in points]
            label = None if precision in seen else precision
            seen.add(precision)
            colour = PRECISION_COLOURS[precision]
            if key == "mmlu":
                errors = [[(p["mmlu"] - p["interval"][0]) * 100 for p in points],
                          [(p["interval"][1] - p["mmlu"]) * 100 for p in points]]
                ax.errorbar(xs, ys, yerr=errors, fmt="-" + PRECISION_MARKERS[precision], color=colour, capsize=3,
                            label=label)
            else:
                ax.plot(xs, ys, "-" + PRECISION_MARKERS[precision], color=colour, label=label)
        if key == "mmlu":
            ax.axhline(data["chance"] * 100, color="C3", linestyle="--", linewidth=1, label="chance (25%)")
        ax.set_xscale("log")
        sizes = sorted({p["params"] / 1e9 for p in data["points"]})
        ax.set_xticks(sizes, [guidance.size_text(x * 1e9) for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.15, y=0.15)
    legend_below(fig, axes[0], 4)
    fig.suptitle("One harness, several sizes: quality, speed and memory against parameters")
    return fig


def draw_speculative(plt, data):
    panels = data["panels"]
    methods_all = sorted({m for panel in panels for m in panel["methods"]},
                         key=lambda m: list(METHOD_COLOURS).index(m) if m in METHOD_COLOURS else len(METHOD_COLOURS))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels) + 0.8), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        methods = [m for m in methods_all if m in panel["methods"]]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = panel["methods"][method]
            ax.bar([x + i * width for x in range(len(values))], values, width, color=METHOD_COLOURS.get(method, "C9"),
                   label=method)
        ax.axhline(1.0, color="black", linewidth=1, label="1.0× = target alone")
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(panel["prompts"]))], panel["prompts"])
        ax.set_ylabel("speed-up ×")
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylim(0, max([1.2] + [v * 1.1 for vs in panel["methods"].values() for v in vs]))
    handles = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = sorted(handles, key=lambda m: list(METHOD_COLOURS).index(m) if m in METHOD_COLOURS else -1)
    fig.legend([handles[m] for m in order], order, loc="lower center", ncol=len(order), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def draw_acceptance(plt, data):
    panels = data["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ks, needed = zip(*panel["break_even"]) if panel["break_even"] else ((), ())
        ax.plot(ks, needed, color="black", label="break-even acceptance α")
        for i, (name, alpha) in enumerate(panel["alpha"]):  # prompts take colours no method uses
            ax.axhline(alpha, color=PROMPT_PALETTE[i % len(PROMPT_PALETTE)], linestyle=":", label=f"measured α, {name}")
        if panel["k"]:
            ax.axvline(panel["k"], color="0.7", linewidth=1, label=f"k used = {panel['k']}")
        ax.set_xlabel("draft tokens per step k")
        ax.set_ylabel("acceptance α")
        ax.set_ylim(0, 1)
        ax.set_title(panel["title"], fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def draw_finetune(plt, data):
    fig, (loss, bars) = plt.subplots(1, 2, figsize=(10, 4.2))
    for i, run in enumerate(data["runs"]):
        name = run["label"].rsplit(" ", 1)[0]
        colour = model_colour(name)
        loss.plot(range(1, len(run["loss"]) + 1), run["loss"], color=colour, label=f"{run['label']} [{run['rid']}]")
        for j, (x, n) in enumerate(run["counts"]):
            if isinstance(x, int) and isinstance(n, int) and 0 <= x <= n > 0:
                low, high = common.wilson_interval(x, n)
                bars.bar(i * 3 + j, x / n * 100, yerr=[[max(0, x / n - low) * 100], [max(0, high - x / n) * 100]],
                         capsize=3, color=colour, alpha=0.45 if j == 0 else 1.0)
    loss.set_yscale("log")
    loss.set_xlabel("training step")
    loss.set_ylabel("training loss (log scale)")
    bars.set_xticks([i * 3 + 0.5 for i in range(len(data["runs"]))],
                    [run["label"].rsplit(" ", 1)[0] for run in data["runs"]], fontsize=8)
    bars.set_ylabel("held-out exact match, % (95% interval)")
    bars.set_ylim(0, 105)
    fig.suptitle("Fine-tuning: loss per step, and held-out exact match before (pale) and after LoRA")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    legend_below(fig, loss, len(data["runs"]))
    return fig


DRAWERS = {"quality": draw_quality, "size": draw_size, "speculative": draw_speculative, "acceptance": draw_acceptance,
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
