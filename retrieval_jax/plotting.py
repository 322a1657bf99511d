"""Line plots as plain SVG files (matplotlib is not a dependency).

`line_plot_svg` draws any number of series (lines, points or both) with
axes, ticks, grid lines and a legend; the experiment modules build their
figures on it.
"""

from collections.abc import Sequence
import dataclasses
import html
import os

import numpy as np

# A colour-blind-safe cycle (Okabe–Ito), used when a series names none.
COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9",
          "#000000", "#f0e442")


@dataclasses.dataclass(frozen=True)
class Series:
  """One curve.

  Attributes:
    label: legend text.
    xs, ys: the points, same length.
    color: SVG colour; "" picks the next of `COLORS`.
    dash: SVG stroke-dasharray ("" = solid).
    line: join the points.
    markers: draw a dot at each point.
  """
  label: str
  xs: Sequence[float]
  ys: Sequence[float]
  color: str = ""
  dash: str = ""
  line: bool = True
  markers: bool = False


def _ticks(lo: float, hi: float, target: int = 6) -> np.ndarray:
  """Round tick values covering [lo, hi] (1, 2 or 5 times a power of 10)."""
  span = max(hi - lo, 1e-12)
  raw = span / target
  power = 10.0 ** np.floor(np.log10(raw))
  step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw))
  return np.arange(np.ceil(lo / step) * step, hi + step * 1e-9, step)


def _fmt(v: float) -> str:
  return f"{v:g}"


def line_plot_svg(path: str | os.PathLike, series: Sequence[Series], *,
                  title: str = "", xlabel: str = "", ylabel: str = "",
                  x_range: tuple[float, float] | None = None,
                  y_range: tuple[float, float] | None = None,
                  legend: str = "upper left",
                  width: int = 640, height: int = 420) -> None:
  """Writes the series to `path` (atomically: a temp file, then rename).

  Args:
    path: the .svg file.
    series: the curves, drawn in order; legend in the top-left corner.
    title, xlabel, ylabel: texts (escaped).
    x_range, y_range: axis limits; None fits the data (y from min(0, ...)).
    legend: "upper left" or "lower right" (where the curves leave room).
    width, height: pixels.

  Raises:
    ValueError: no series, or a series whose xs and ys differ in length.
  """
  if not series:
    raise ValueError("nothing to plot: no series")
  if legend not in ("upper left", "lower right"):
    raise ValueError(f"legend={legend!r}: expected 'upper left' or "
                     "'lower right'")
  for s in series:
    if len(s.xs) != len(s.ys):
      raise ValueError(f"series {s.label!r}: {len(s.xs)} xs but "
                       f"{len(s.ys)} ys")
  xs = np.concatenate([np.asarray(s.xs, float) for s in series])
  ys = np.concatenate([np.asarray(s.ys, float) for s in series])
  lo, hi = x_range or (xs.min(), xs.max())
  y_lo, y_hi = y_range or (min(0.0, ys.min()), ys.max() * 1.05)
  hi = hi if hi > lo else lo + 1
  y_hi = y_hi if y_hi > y_lo else y_lo + 1
  left, right, top, bottom = 64, 20, 40, 50

  def sx(x):
    return left + (x - lo) / (hi - lo) * (width - left - right)

  def sy(y):
    return height - bottom - (y - y_lo) / (y_hi - y_lo) * (
        height - top - bottom)

  esc = html.escape
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" '
           f'font-size="14">{esc(title)}</text>']
  x0, y0 = sx(lo), sy(y_lo)
  for y in _ticks(y_lo, y_hi):
    parts.append(f'<line x1="{x0}" y1="{sy(y):.1f}" x2="{sx(hi):.1f}" '
                 f'y2="{sy(y):.1f}" stroke="#eeeeee"/>')
    parts.append(f'<text x="{x0 - 6}" y="{sy(y) + 4:.1f}" '
                 f'text-anchor="end">{_fmt(y)}</text>')
  for x in _ticks(lo, hi):
    parts.append(f'<text x="{sx(x):.1f}" y="{y0 + 16}" '
                 f'text-anchor="middle">{_fmt(x)}</text>')
  parts.append(f'<line x1="{x0}" y1="{y0}" x2="{sx(hi):.1f}" y2="{y0}" '
               'stroke="black"/>')
  parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{sy(y_hi):.1f}" '
               'stroke="black"/>')
  parts.append(f'<text x="{width / 2}" y="{height - 10}" '
               f'text-anchor="middle">{esc(xlabel)}</text>')
  parts.append(f'<text x="15" y="{height / 2}" text-anchor="middle" '
               f'transform="rotate(-90 15 {height / 2})">{esc(ylabel)}</text>')
  # Legend entries: a 30-px line sample, then the label.
  if legend == "upper left":
    legend_x, legend_top = left + 20, top + 12
  else:
    legend_x = width - right - 230
    legend_top = height - bottom - 12 - 18 * (len(series) - 1)
  for i, s in enumerate(series):
    color = s.color or COLORS[i % len(COLORS)]
    points = [(sx(x), sy(y)) for x, y in zip(s.xs, s.ys)]
    legend_y = legend_top + 18 * i
    if s.line:
      joined = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
      parts.append(f'<polyline points="{joined}" fill="none" '
                   f'stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{s.dash}"/>')
      parts.append(f'<line x1="{legend_x}" y1="{legend_y}" '
                   f'x2="{legend_x + 30}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-width="2" stroke-dasharray="{s.dash}"/>')
    if s.markers:
      parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" '
                   f'fill="{color}"/>' for x, y in points)
      parts.append(f'<circle cx="{legend_x + 15}" cy="{legend_y}" r="4" '
                   f'fill="{color}"/>')
    parts.append(f'<text x="{legend_x + 36}" y="{legend_y + 4}">'
                 f'{esc(s.label)}</text>')
  parts.append("</svg>")
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(parts) + "\n")
  os.replace(tmp, path)
