"""One house style for every figure, so chapters look like one book."""
import matplotlib

PALETTE = {"first": "#d95f02", "second": "#1b9e77", "truth": "#333333", "exact": "#7570b3",
           "lissa": "#e7298a", "dissertation": "#666666"}


def set_style() -> None:
    import seaborn as sns
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "axes.titleweight": "bold",
                                "axes.spines.top": False, "axes.spines.right": False})


def identity_line(ax, **kw) -> None:
    """Draw y = x across the current limits of ``ax``."""
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color=kw.pop("color", "#2ca02c"), label=kw.pop("label", "y = x"), **kw)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def grouped_bars(table, index: str, ylabel: str, title: str, figsize=(9, 3.2), color=None, legend_cols: int = 3):
    """A figure of grouped bars: one group per row of ``table`` (a DataFrame) named by column ``index``, one bar
    per other column."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=figsize)
    table.set_index(index).plot.bar(ax=ax, rot=0, color=color)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=7, ncol=legend_cols)
    return fig
