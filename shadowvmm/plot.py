"""A timeline as a picture: a Gantt chart of phases per ``(level, device)`` row, events as
markers, the downtime shaded and labelled in ms (:func:`plot_timeline`).

matplotlib is an optional dependency (``pip install 'shadowvmm[plot]'``): it is imported when
a plot is asked for, and its absence is a :class:`~shadowvmm.errors.MissingExtraError`. The
Agg backend draws without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MissingExtraError
from .timeline import EventKind, Timeline

#: Marker and colour of each event kind (phases are bars, not markers).
MARKERS: dict[EventKind, tuple[str, str]] = {
    EventKind.STATUS_READ: (".", "tab:gray"),
    EventKind.STATUS_WRITE: ("|", "black"),
    EventKind.STOP_START: ("v", "tab:red"),
    EventKind.STOP_END: ("^", "tab:red"),
    EventKind.RESUME: (">", "tab:green"),
    EventKind.DRAIN_START: ("4", "tab:orange"),
    EventKind.DRAIN_END: ("3", "tab:orange"),
    EventKind.GET_VRING_BASE: ("x", "tab:purple"),
    EventKind.ADMIN_COMMAND: ("s", "tab:brown"),
    EventKind.RING_STATE: ("d", "tab:purple"),
    EventKind.PRECOPY_ROUND: ("o", "tab:blue"),
    EventKind.SWITCH_OVER: ("*", "tab:olive"),
    EventKind.DEST_START: ("D", "tab:green"),
    EventKind.MARK: ("+", "tab:cyan"),
}
PHASE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError("plotting a timeline", "matplotlib", "plot") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_timeline(timeline: Timeline, path: str | Path, *, title: str = "") -> Path:
    """Draw *timeline* into the PNG file *path* (time in ms from the timeline's origin)."""
    plt = _pyplot()
    rows = timeline.rows()
    index = {row: i for i, row in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * max(len(rows), 1)))
    try:
        phase_colour: dict[str, str] = {}
        for span in timeline.spans():
            colour = phase_colour.setdefault(span.phase, PHASE_COLOURS[len(phase_colour) % len(PHASE_COLOURS)])
            y = index[(span.level, span.device)]
            ax.barh(y, (span.end - span.start) * 1e3, left=span.start * 1e3, height=0.5, color=colour,
                    alpha=0.45, label=f"phase: {span.phase}")
        for kind, (marker, colour) in MARKERS.items():
            events = timeline.of(kind)
            if events:
                ax.scatter([e.t * 1e3 for e in events], [index[(e.level, e.device)] for e in events],
                           marker=marker, color=colour, s=40, zorder=3, label=kind.value)
        down = timeline.downtime()
        if down is not None:
            start, end = down[0] * 1e3, down[1] * 1e3
            ax.axvspan(start, end, color="tab:red", alpha=0.12, zorder=0)
            ax.annotate(f"downtime {end - start:.2f} ms", xy=((start + end) / 2, -0.75),
                        ha="center", va="center", color="tab:red")
        ax.set_yticks(range(len(rows)), [f"{level} {device}" for level, device in rows])
        ax.set_ylim(len(rows) - 0.4, -1.0)      # first row on top, room above it for the label
        ax.set_xlabel("time (ms)")
        ax.set_title(title or "shadowvmm timeline")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out
