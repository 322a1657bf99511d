"""Tests for retrieval_jax.plotting: the SVG parses and holds what was drawn."""

import xml.etree.ElementTree as ET

from absl.testing import absltest
import numpy as np

from retrieval_jax import plotting

_NS = "{http://www.w3.org/2000/svg}"


class LinePlotTest(absltest.TestCase):

  def test_elements_positions_and_escaping(self):
    path = self.create_tempfile("p.svg").full_path
    plotting.line_plot_svg(path, [
        plotting.Series("a < b", [0, 1, 2], [0.0, 0.5, 1.0]),
        plotting.Series("points", [0, 2], [1.0, 0.0], line=False,
                        markers=True, color="red")],
        title="t & u", xlabel="x", ylabel="y", y_range=(0.0, 1.0))
    root = ET.parse(path).getroot()  # Escaping keeps it well-formed.
    texts = [t.text for t in root.iter(f"{_NS}text")]
    self.assertIn("a < b", texts)
    self.assertIn("t & u", texts)
    # Ticks are round numbers covering the axis range.
    self.assertContainsSubset({"0", "0.2", "0.4", "0.6", "0.8", "1"},
                              set(texts))
    lines = root.findall(f"{_NS}polyline")
    self.assertLen(lines, 1)
    points = np.array([p.split(",") for p in
                       lines[0].get("points").split()], float)
    # y = 0.5 lies halfway between the y = 0 and y = 1 points; x is linear.
    self.assertAlmostEqual(points[1, 1], points[[0, 2], 1].mean(), places=1)
    self.assertAlmostEqual(points[1, 0], points[[0, 2], 0].mean(), places=1)
    # Two data markers plus the legend's, in the series' colour.
    circles = root.findall(f"{_NS}circle")
    self.assertLen(circles, 3)
    self.assertEqual({c.get("fill") for c in circles}, {"red"})

  def test_bad_input(self):
    path = self.create_tempfile("p.svg").full_path
    with self.assertRaisesRegex(ValueError, "no series"):
      plotting.line_plot_svg(path, [])
    with self.assertRaisesRegex(ValueError, "'s': 2 xs but 1 ys"):
      plotting.line_plot_svg(path, [plotting.Series("s", [0, 1], [1])])


if __name__ == "__main__":
  absltest.main()
