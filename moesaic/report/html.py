"""A self-contained HTML report: text, tables and figures embedded as base64 PNG.

Nothing in the page refers to another file or URL, so `report.html` can be mailed, archived or
opened offline. All text passes through `html.escape`; the page holds no script.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f2f2f2; }
td.l, th.l { text-align: left; }
caption { caption-side: bottom; font-size: .85em; color: #555; padding-top: .3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
.note { background: #f7f7f0; border-left: 4px solid #cc9; padding: .5em 1em; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def png_bytes(fig: Any, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class HtmlReport:
    """Builds one self-contained page; every method escapes what it is given."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = [f"<h1>{esc(title)}</h1>"]

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> None:
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.parts.append(f"<h{level}{ident}>{esc(text)}</h{level}>")

    def paragraph(self, text: str, css: str | None = None) -> None:
        cls = f' class="{esc(css)}"' if css else ""
        self.parts.append(f"<p{cls}>{esc(text)}</p>")

    def bullets(self, items: Sequence[str]) -> None:
        self.parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")

    def code(self, text: str) -> None:
        self.parts.append(f"<pre><code>{esc(text)}</code></pre>")

    def table(
        self,
        header: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str | None = None,
        left: int = 1,
    ) -> None:
        """A table; the first `left` columns (labels) are left-aligned, the rest right."""

        def cell(tag: str, i: int, value: Any) -> str:
            cls = ' class="l"' if i < left else ""
            return f"<{tag}{cls}>{esc(value)}</{tag}>"

        head = "".join(cell("th", i, h) for i, h in enumerate(header))
        body = "".join(
            "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
        )
        cap = f"<caption>{esc(caption)}</caption>" if caption else ""
        self.parts.append(
            f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def figure(self, fig_or_png: Any, caption: str, alt: str | None = None) -> None:
        """Embed a matplotlib figure (closed afterwards) or PNG bytes."""
        png = fig_or_png if isinstance(fig_or_png, bytes) else png_bytes(fig_or_png)
        self.parts.append(
            f'<figure><img src="{data_uri(png)}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    def html(self) -> str:
        body = "\n".join(self.parts)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{STYLE}</style>"
            f"</head>\n<body>\n{body}\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        from moesaic.files import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.html())
        return path
