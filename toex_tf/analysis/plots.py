"""Plots of an exit sweep, written as PNG files.

Matplotlib's object API (`Figure`, then `savefig`) draws without pyplot or a GUI backend,
so importing this module leaves a notebook's backend and figures alone.
"""

from matplotlib.figure import Figure


def plot_exit_curve(results: dict, path: str) -> str:
    """Savings against perplexity increase, one line per criterion; writes a PNG.

    Args:
        results: the `results.json` dict (`baseline` and `sweeps`).
        path: where to write the PNG.

    Returns:
        `path`.
    """
    base = results["baseline"]["perplexity"]
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="tight")
    axis = figure.subplots()
    for criterion in dict.fromkeys(row["criterion"] for row in results["sweeps"]):
        rows = sorted(
            (r for r in results["sweeps"] if r["criterion"] == criterion),
            key=lambda r: r["savings"],
        )
        axis.plot(
            [100 * (r["perplexity"] / base - 1) for r in rows],
            [100 * r["savings"] for r in rows],
            marker="o",
            markersize=3,
            label=criterion,
        )
    axis.axvline(5, color="grey", linestyle=":", linewidth=1)
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.set_xlabel("perplexity increase over full depth (%)")
    axis.set_ylabel("compute saved, overhead counted (%)")
    axis.set_title(f"Exit sweep ({results['baseline']['num_layers']} layers)")
    axis.legend()
    figure.savefig(path)
    return path
