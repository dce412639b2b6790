"""The report as a document: one self-contained HTML page and its Markdown twin.

A report is a list of :class:`Section`, each a list of blocks: a paragraph, a table (shown as
formatted strings, with the raw numbers in a CSV file beside it) or a figure (PNG bytes, embedded
in the HTML as a base64 data URI and referenced by file name from the Markdown; the SVG file
beside it is named in both).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

import pandas as pd

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1150px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; }
th, td { border: 1px solid #d0d0d0; padding: .3rem .6rem; text-align: right; }
th { background: #f0f2f5; } td:first-child, th:first-child { text-align: left; }
td { background: #fff; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #e2e2e2; margin: .5rem 0; }
.wide { overflow-x: auto; max-width: 100%; }
.wide td:first-child, .wide th:first-child { position: sticky; left: 0; z-index: 1;
       box-shadow: 1px 0 0 #b0b0b0; }
figure { margin: 1rem 0; }
.note { color: #555; font-size: .9rem; } .file { color: #777; font-size: .8rem; }
.warning { color: #8a1c1c; background: #fdecec; border-left: 4px solid #c62828;
           padding: .4rem .7rem; font-weight: 600; }
pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; font-size: .82rem; }
"""


@dataclass
class Block:
    """One piece of a section: ``kind`` is ``text``, ``warning``, ``code``, ``table`` or
    ``figure``.

    Attributes:
        text: the paragraph (text, warning), or the caption (code, table, figure).
        code: verbatim text, e.g. a YAML config (code).
        table: the table as display strings (table).
        png: the figure's PNG bytes (figure).
        file: the CSV or PNG file written beside the report for this block.
    """

    kind: str
    text: str = ""
    table: pd.DataFrame | None = None
    png: bytes | None = None
    file: str = ""
    code: str = ""


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def eps_text(eps: float) -> str:
    """An eps to three digits and in 8-bit grey levels: ``0.0314 (8/255)``, ``0.009 (2.29/255)``;
    images are in [0, 1], so ``eps * 255`` grey levels of an 8-bit image."""
    return f"{eps:.3g} ({eps * 255:.3g}/255)"


def format_table(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Display strings: floats to ``digits`` places, ``params`` in millions, NaN as ``n/a``."""

    def cell(column: str, value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        if column == "params" and isinstance(value, (int, float)):
            return f"{value / 1e6:.2f}M"
        if column == "eps" and isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    return pd.DataFrame(
        {c: [cell(str(c), v) for v in frame[c].tolist()] for c in frame.columns}, dtype=object
    )


def render_html(title: str, intro: str, sections: list[Section]) -> str:
    """One self-contained HTML page (inline CSS, figures as data URIs)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(intro)}</p>',
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            parts.append(_html_block(block))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    file = f' <span class="file">({html.escape(block.file)})</span>' if block.file else ""
    if block.kind == "text":
        return f"<p>{html.escape(block.text)}</p>"
    if block.kind == "warning":
        return f'<p class="warning">Warning: {html.escape(block.text)}</p>'
    if block.kind == "code":
        return (
            f"<details><summary>{html.escape(block.text)}{file}</summary>"
            f"<pre>{html.escape(block.code)}</pre></details>"
        )
    if block.kind == "table":
        table = block.table.to_html(index=False, border=0, escape=True)
        return f'<p class="note">{html.escape(block.text)}{file}</p><div class="wide">{table}</div>'
    data = base64.b64encode(block.png).decode("ascii")
    if block.file.endswith(".png"):  # the report writes each figure as SVG beside its PNG
        file = f' <span class="file">({html.escape(block.file)}, {_svg(block.file)})</span>'
    return (
        f'<figure><img alt="{html.escape(block.text)}" src="data:image/png;base64,{data}">'
        f'<figcaption class="note">{html.escape(block.text)}{file}</figcaption></figure>'
    )


def _svg(png: str) -> str:
    return png[: -len(".png")] + ".svg"


def render_markdown(title: str, intro: str, sections: list[Section]) -> str:
    """The same report in Markdown; figures are linked by their PNG file names."""
    lines = [f"# {title}", "", intro, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if block.kind == "text":
                lines += [block.text, ""]
            elif block.kind == "warning":
                lines += [f"**Warning: {block.text}**", ""]
            elif block.kind == "code":
                lines += [f"{block.text} ({block.file})" if block.file else block.text, ""]
                lines += ["```", block.code.rstrip("\n"), "```", ""]
            elif block.kind == "table":
                lines += [f"{block.text} ({block.file})", "", _markdown_table(block.table), ""]
            else:
                vector = f" ([SVG]({_svg(block.file)}))" if block.file.endswith(".png") else ""
                lines += [f"![{block.text}]({block.file})", "", f"*{block.text}*{vector}", ""]
    return "\n".join(lines)


def _markdown_table(table: pd.DataFrame) -> str:
    def row(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [row([str(c) for c in table.columns]), row(["---"] * len(table.columns))]
    lines += [row([str(v) for v in values]) for values in table.itertuples(index=False)]
    return "\n".join(lines)
