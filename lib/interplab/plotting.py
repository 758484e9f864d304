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


def schematic(boxes: dict, arrows, title: str, figsize=(10, 3.2)):
    """An overview diagram: ``boxes`` {name: (x, y, text)} in axes units [0, 1], ``arrows`` [(from, to)]
    or [(from, to, label)], drawn box edge to box edge. For the chapters' overview figures (Figs 8.1, 9.3)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=figsize)
    ax.set(xlim=(0, 1), ylim=(0, 1), title=title)
    ax.axis("off")
    style = dict(boxstyle="round,pad=0.4", fc="#f2f2f2", ec="#555555")
    patches = {name: ax.text(x, y, text, ha="center", va="center", fontsize=8, bbox=style)
               for name, (x, y, text) in boxes.items()}
    fig.canvas.draw()  # box sizes are known only once drawn
    for a, b, *label in arrows:
        ax.annotate("", xy=boxes[b][:2], xytext=boxes[a][:2], xycoords="data",
                    arrowprops=dict(arrowstyle="-|>", color="#333333", lw=1.2, shrinkA=0, shrinkB=0,
                                    patchA=patches[a].get_bbox_patch(), patchB=patches[b].get_bbox_patch()))
        if label:
            ax.text((boxes[a][0] + boxes[b][0]) / 2, (boxes[a][1] + boxes[b][1]) / 2 + 0.04, label[0],
                    ha="center", fontsize=7, color="#333333")
    return fig
