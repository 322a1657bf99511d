"""Line plots for the experiments' results: matplotlib (Agg), PNG and SVG.

`line_plot` draws any number of series (lines, points or both) and writes
<path>.png and <path>.svg atomically. SVG text stays text (searchable).
"""

from collections.abc import Sequence
import dataclasses
import io
import os
import pathlib

try:
  import matplotlib
  from matplotlib import figure
  from matplotlib.backends import backend_agg
except ImportError as e:
  raise ImportError(
      "the experiments' plots need matplotlib: pip install -e '.[experiments]'"
  ) from e

from retrieval_jax import io as rj_io

# SVG text stays <text> (not glyph outlines); fixed ids: reproducible files.
_SVG_TEXT = {"svg.fonttype": "none", "svg.hashsalt": "retrieval_jax"}


@dataclasses.dataclass(frozen=True)
class Series:
  """One curve.

  Attributes:
    label: legend text.
    xs, ys: the points, same length.
    color: a matplotlib colour; None takes the next of the default cycle.
    dashed: draw the line dashed.
    line: join the points.
    markers: draw a dot at each point.
  """

  label: str
  xs: Sequence[float]
  ys: Sequence[float]
  color: str | None = None
  dashed: bool = False
  line: bool = True
  markers: bool = False


def line_plot(
    path: str | os.PathLike,
    series: Sequence[Series],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    legend: str = "best",
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the series to <path>.png and <path>.svg (any suffix replaced).

  Args:
    path: the output files' path; its suffix is replaced.
    series: the curves, drawn in order.
    title, xlabel, ylabel: texts.
    x_range, y_range: axis limits; None fits the data.
    legend: a matplotlib legend location ("best", "lower right", ...).

  Returns:
    (PNG path, SVG path).

  Raises:
    ValueError: no series, or a series whose xs and ys differ in length.
  """
  if not series:
    raise ValueError("nothing to plot: no series")
  for s in series:
    if len(s.xs) != len(s.ys):
      raise ValueError(f"series {s.label!r}: {len(s.xs)} xs but {len(s.ys)} ys")
  # A Figure with its own Agg canvas: no pyplot state, no display needed.
  fig = figure.Figure(figsize=(6.4, 4.2), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for s in series:
    ax.plot(
        s.xs,
        s.ys,
        color=s.color,
        label=s.label,
        linestyle=("--" if s.dashed else "-") if s.line else "none",
        marker="o" if s.markers else None,
        markersize=4,
    )
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if x_range is not None:
    ax.set_xlim(*x_range)
  if y_range is not None:
    ax.set_ylim(*y_range)
  ax.grid(True, color="#eeeeee")
  ax.legend(loc=legend)
  fig.tight_layout()
  base = pathlib.Path(path).with_suffix("")
  out = []
  for fmt in ("png", "svg"):
    buf = io.BytesIO()
    # No timestamps in the files: the same data gives the same bytes.
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context(_SVG_TEXT):
      fig.savefig(buf, format=fmt, metadata=metadata)
    target = base.with_name(f"{base.name}.{fmt}")
    rj_io.write_bytes_atomic(target, buf.getvalue())
    out.append(target)
  return out[0], out[1]
