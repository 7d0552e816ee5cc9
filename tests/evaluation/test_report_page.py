"""The report page's building blocks: every number a table shows names its JSON path and equals
the report's value there; plots are embedded PNGs; the page needs no network."""
import base64
import io
import re
from html.parser import HTMLParser

import pytest
from PIL import Image

from evaluation.report_page import image, lookup, number, page, png_of, table

REPORT = {"code_length": {"a-16": {"map_all": 0.81234567, "bytes": 2}, "a-64": {"map_all": 0.9, "bytes": 8},
                          "b-64": {"map_all": None, "bytes": 8}},
          "pareto": {"points": [{"name": "a-16", "front": True}]}}


class Cells(HTMLParser):
    """(data-key, text, classes) of every table cell, and the src of every image."""

    def __init__(self):
        super().__init__()
        self.cells, self.images, self._open = [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-key" in attrs:
            self._open = [attrs["data-key"], "", attrs.get("class", "")]
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append(tuple(self._open))
            self._open = None


def test_every_cell_shows_the_value_at_its_path_and_marks_the_best():
    rows = [(name, f"code_length.{name}") for name in REPORT["code_length"]]
    html = table(REPORT, rows, [("mAP", "map_all"), ("bytes", "bytes")], best="max")
    parser = Cells()
    parser.feed(html)
    assert len(parser.cells) == 6
    for key, text, _ in parser.cells:
        assert text == number(lookup(REPORT, key))
    assert [k for k, _, c in parser.cells if c == "best"] == ["code_length.a-64.map_all", "code_length.a-64.bytes",
                                                              "code_length.b-64.bytes"]
    assert number(None) == "-" and number(0.81234567) == "0.8123" and number(12345) == "12,345"
    assert lookup(REPORT, "pareto.points.0.front") is True
    with pytest.raises(KeyError, match="pareto.points.1.front: no '1'"):
        lookup(REPORT, "pareto.points.1.front")


def test_the_page_embeds_its_plots_and_links_nothing_outside():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(3, 2))
    axes.plot([16, 32, 64], [0.8, 0.85, 0.9])
    html = page("TerraHash report", [("dial", "Code length", image(png_of(figure), "mAP by code length", "mAP")),
                                     ("x", "<b>escaped</b>", "<p>text</p>")])
    parser = Cells()
    parser.feed(html)
    (src,) = parser.images
    assert src.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size[0] > 100
    assert "&lt;b&gt;escaped&lt;/b&gt;" in html and '<a href="#dial">' in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing fetched from a network
