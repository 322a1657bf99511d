"""Tests for experiments/plotting.py: both files written, valid, labelled."""

import pathlib
import struct
import xml.etree.ElementTree as ET

from absl.testing import absltest

from experiments import plotting


class LinePlotTest(absltest.TestCase):

  def test_writes_png_and_svg_with_the_labels(self):
    out = pathlib.Path(self.create_tempdir().full_path)
    png, svg = plotting.line_plot(
        out / "curve.svg",
        [
            plotting.Series("a < b", [0, 1, 2], [0.0, 0.5, 1.0]),
            plotting.Series(
                "points",
                [0, 2],
                [1.0, 0.0],
                line=False,
                markers=True,
                color="red",
                dashed=True,
            ),
        ],
        title="t & u",
        xlabel="x axis",
        ylabel="y axis",
        y_range=(0.0, 1.0),
        legend="lower right",
    )
    self.assertEqual((png, svg), (out / "curve.png", out / "curve.svg"))
    self.assertEqual(
        sorted(p.name for p in out.iterdir()), ["curve.png", "curve.svg"]
    )  # No temp files left.
    data = png.read_bytes()
    self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
    # IHDR: 6.4 x 4.2 inches at 100 dpi.
    self.assertEqual(struct.unpack(">II", data[16:24]), (640, 420))
    root = ET.parse(svg).getroot()  # Escaping keeps it well-formed.
    self.assertTrue(root.tag.endswith("svg"))
    texts = {
        "".join(t.itertext()) for t in root.iter() if t.tag.endswith("text")
    }
    self.assertContainsSubset(
        {"a < b", "points", "t & u", "x axis", "y axis"}, texts
    )

  def test_same_data_same_bytes(self):
    out = pathlib.Path(self.create_tempdir().full_path)
    series = [plotting.Series("s", [1, 2, 3], [3, 1, 2], markers=True)]
    first = [p.read_bytes() for p in plotting.line_plot(out / "a", series)]
    second = [p.read_bytes() for p in plotting.line_plot(out / "b", series)]
    self.assertEqual(first, second)

  def test_bad_input(self):
    path = pathlib.Path(self.create_tempdir().full_path) / "p"
    with self.assertRaisesRegex(ValueError, "no series"):
      plotting.line_plot(path, [])
    with self.assertRaisesRegex(ValueError, "'s': 2 xs but 1 ys"):
      plotting.line_plot(path, [plotting.Series("s", [0, 1], [1])])
    self.assertFalse(path.parent.joinpath("p.png").exists())


if __name__ == "__main__":
  absltest.main()
