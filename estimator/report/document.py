"""The report's document model (sections of paragraphs, bullets, notes, tables and figures) and its two
renderings: one self-contained HTML page (PNG figures inlined as base64, no external CSS/JS) and a Markdown twin
(figures as PNG files next to it)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

FIGURE_PREFIX = "fig-"
HTML_NAME, MARKDOWN_NAME = "report.html", "report.md"


SECTIONS: dict[str, str] = {
    "glance": "At a glance",
    "manifest": "Run manifest",
    "latency": "Latency vs prompt length and KV position",
    "spread": "Experiment 1: latency spread at equal token count",
    "accuracy": "Predicted vs measured",
    "variants": "Experiment 2: error per feature variant",
    "telemetry": "Telemetry timeline",
    "importance": "Feature importance",
    "batch": "Batch level: engine iterations under continuous batching",
    "simulation": "Workload simulation against replays and a live server",
    "calibration": "Calibrated on the running server: loads it never saw",
    "scheduling": "Scheduling by predicted latency on the real engine",
    "nightly": "Nightly trend",
}  # page order, except that the nightly section (only with a history or summary) comes right after the glance


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Note:
    """A callout: something missing (and what to run) or a caveat."""

    text: str


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    name: str
    png: bytes
    caption: str


Block = Paragraph | Bullets | Note | Table | Figure


@dataclass
class Section:
    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, block: Block) -> None:
        self.blocks.append(block)

    @property
    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]


@dataclass
class Report:
    """The document: title, subtitle and sections; `write` renders the HTML page and the Markdown twin."""

    title: str
    subtitle: str
    sections: list[Section]
    missing: list[str] = field(default_factory=list)

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.sections for f in s.figures]

    def write(self, out: Path) -> ReportFiles:
        """Write report.html (self-contained), report.md and the figures as PNG files into `out`."""
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f"{FIGURE_PREFIX}*.png"):
            stale.unlink()
        images = []
        for fig in self.figures:
            path = out / f"{fig.name}.png"
            path.write_bytes(fig.png)
            images.append(path)
        html_path, md_path = out / HTML_NAME, out / MARKDOWN_NAME
        html_path.write_text(render_html(self), encoding="utf-8")
        md_path.write_text(render_markdown(self), encoding="utf-8")
        return ReportFiles(html=html_path, markdown=md_path, images=images)


# ---------------------------------------------------------------- rendering


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;background:#f6f7f9;
color:#1d2430;line-height:1.45;font-size:15px}
main{max-width:1340px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;padding-top:10px;border-top:2px solid #e3e6ea}
.subtitle{color:#5b6675;font-size:13px;margin-bottom:12px}
nav{font-size:14px;margin:10px 0 6px}nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
nav a:hover{text-decoration:underline}
figure{margin:14px 0 18px}figure img{width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{font-size:13px;color:#4a5563;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px;width:auto;max-width:100%}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
caption{caption-side:bottom;text-align:left;font-size:12px;color:#5b6675;padding-top:3px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;margin:10px 0;font-size:14px}
code{background:#eef1f5;padding:0 3px;border-radius:3px;font-size:90%}
ul{margin:6px 0 12px}li{margin:2px 0}
"""

_NUMERIC = re.compile(r"^[-+]?[\d.,]+\s*(%|×|ms|s)?$|^–$")


def _inline_html(text: str) -> str:
    """Escape, then `code` and **bold**."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_inline_html(c)}</th>" for c in t.columns)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="num">{_inline_html(v)}</td>' if _NUMERIC.match(v.strip()) else f"<td>{_inline_html(v)}</td>"
            for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<caption>{_inline_html(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, PNGs as data URIs, no scripts, no external links needed."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<div class="subtitle">{_inline_html(report.subtitle)}</div>',
        "<nav>" + "".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in report.sections) + "</nav>",
    ]
    for s in report.sections:
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Paragraph):
                parts.append(f"<p>{_inline_html(b.text)}</p>")
            elif isinstance(b, Bullets):
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
            elif isinstance(b, Note):
                parts.append(f'<div class="note">{_inline_html(b.text)}</div>')
            elif isinstance(b, Table):
                parts.append(_html_table(b))
            else:
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption, quote=True)}">'
                    f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>"
                )
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(v: str) -> str:
    return v.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    """The same document as Markdown; figures are referenced as PNG files in the same folder."""
    lines = [f"# {report.title}", "", f"_{report.subtitle}_", ""]
    for s in report.sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Paragraph):
                lines += [b.text, ""]
            elif isinstance(b, Bullets):
                lines += [f"- {i}" for i in b.items] + [""]
            elif isinstance(b, Note):
                lines += [f"> **Note:** {b.text}", ""]
            elif isinstance(b, Table):
                lines.append("| " + " | ".join(_md_cell(c) or " " for c in b.columns) + " |")
                lines.append("|" + "|".join("---" for _ in b.columns) + "|")
                lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in b.rows]
                lines += ["", f"_{b.caption}_", ""] if b.caption else [""]
            else:
                lines += [f"![{s.title}]({b.name}.png)", "", f"_{b.caption}_", ""]
    return "\n".join(lines)
