"""HTML building blocks of the report: escaping, tables, notes, figures and the page with its inline style.

Every text that comes from a file goes through :func:`esc`; pieces already built as HTML are :class:`Markup`
and pass through unchanged. Nothing here refers to anything outside the page (no scripts, stylesheets, fonts
or links other than ``#anchors``); images are ``data:`` URIs made by :mod:`autoseg.report.figures`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any


class Markup(str):
    """A string that already is HTML (built here from escaped parts); :func:`esc` leaves it as it is."""


def esc(value: Any) -> Markup:
    """``value`` as HTML text: ``&``, ``<``, ``>`` and quotes escaped (a :class:`Markup` passes unchanged)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    """Escaped parts joined by ``sep`` (which is HTML)."""
    return Markup(sep.join(esc(p) for p in parts))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: floats with ``digits`` decimals, integers with thousands separators, missing or
    NaN as an en dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "\u2013" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def fmt_g(value: Any, digits: int = 4) -> str:
    """A number in general format (``0.000123``, ``1.5e+07``); missing or NaN as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2013"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}g}"
    return str(value)


def shape_text(values: Sequence[Any], digits: int = 3) -> str:
    """``(1.0, 0.5, 0.5)`` -> ``1 x 0.5 x 0.5``."""
    return " \u00d7 ".join(fmt_g(float(v), digits) for v in values)


def tag(name: str, body: Any = "", **attrs: Any) -> Markup:
    """``<name attrs>body</name>``; attribute values are escaped (``class_`` gives ``class``)."""
    text = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{text}>{esc(body)}</{name}>")


def table(head: Sequence[Any], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = (),
          highlight: Sequence[int] = (), caption: str | None = None) -> Markup:
    """A table; cells are escaped unless they are :class:`Markup`.

    Args:
        head: column titles.
        rows: the cells of each row.
        numeric: indices of right-aligned (numeric) columns.
        highlight: indices of rows shown highlighted (e.g. the chosen model).
        caption: a line under the table.
    """
    num = set(numeric)
    marked = set(highlight)
    out = ['<div class="tw"><table>']
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(
        f'<th{" class=num" if i in num else ""}>{esc(h)}</th>' for i, h in enumerate(head)) + "</tr></thead><tbody>")
    for r, row in enumerate(rows):
        cells = "".join(f'<td{" class=num" if i in num else ""}>{esc(c)}</td>' for i, c in enumerate(row))
        out.append(f'<tr{" class=hl" if r in marked else ""}>{cells}</tr>')
    out.append("</tbody></table></div>")
    return Markup("".join(out))


def key_values(pairs: Sequence[tuple[str, Any]]) -> Markup:
    """A two-column table of names and values."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return Markup(f'<div class="tw"><table class="kv"><tbody>{rows}</tbody></table></div>')


def bullets(items: Iterable[Any]) -> Markup:
    """An unordered list (empty string when there are no items)."""
    lis = "".join(f"<li>{esc(i)}</li>" for i in items)
    return Markup(f"<ul>{lis}</ul>") if lis else Markup("")


def details(summary: str, body: Any) -> Markup:
    """A part shown on request (a click on ``summary``; no script needed)."""
    return Markup(f"<details><summary>{esc(summary)}</summary>{esc(body)}</details>")


def code(text: str) -> Markup:
    """A block of code (e.g. a command line)."""
    return Markup(f"<pre><code>{esc(text)}</code></pre>")


def command(text: str) -> Markup:
    """Inline code for a command line that wraps only between words (never after a ``-`` inside an option)."""
    return Markup("<code>" + " ".join(f'<span class="nw">{esc(w)}</span>' for w in text.split(" ")) + "</code>")


def unavailable(what: str, cmd: str) -> Markup:
    """The one line a section shows when its files do not exist yet."""
    return Markup(f'<p class="na">Not available yet: {esc(what)}. Run {command(cmd)}.</p>')


def note(text: str) -> Markup:
    """A warning line (a file that could not be read, an image that could not be drawn)."""
    return Markup(f'<p class="note">{esc(text)}</p>')


def notes(texts: Iterable[str]) -> Markup:
    """:func:`note` for each text."""
    return Markup("".join(note(t) for t in texts))


def figure(uri: str, alt: str, caption: str | None = None) -> Markup:
    """An embedded PNG (``uri`` must be a ``data:image/png;base64`` URI) with a caption."""
    if not uri.startswith("data:image/png;base64,"):
        raise ValueError("report figures must be embedded PNG data URIs")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return Markup(f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>')


def section(anchor: str, title: str, body: Iterable[Any], intro: str | None = None) -> Markup:
    """A numbered top-level section (``anchor`` is its id, used by the contents list)."""
    lead = f'<p class="intro">{esc(intro)}</p>' if intro else ""
    return Markup(f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{lead}{join(body)}</section>')


_STYLE = """
:root{--fg:#1d2430;--muted:#5b6576;--line:#d9dee7;--bg:#ffffff;--soft:#f4f6fa;--accent:#1f5fbf;--warn:#9a4d00}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.55 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",
Arial,"Noto Sans","DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 32px 64px}
header{border-bottom:2px solid var(--line);padding-bottom:14px;margin-bottom:8px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:21px;margin:40px 0 10px;padding-top:8px;border-top:1px solid var(--line)}
h3{font-size:16.5px;margin:24px 0 8px}
p{margin:8px 0}
.meta{color:var(--muted);font-size:13.5px}
.intro{color:var(--muted)}
nav ul{columns:2;margin:12px 0 0;padding-left:0;list-style:none}
nav li{margin:3px 0}
nav a,a{color:var(--accent);text-decoration:none}
.tw{overflow-x:auto;margin:10px 0 14px}
table{border-collapse:collapse;font-size:13.5px}
caption{caption-side:bottom;text-align:left;color:var(--muted);font-size:12.5px;padding-top:4px}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{background:var(--soft);border-bottom:2px solid var(--line);white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{background:var(--soft);font-weight:600;white-space:nowrap}
tr.hl td{background:#eaf2ff;font-weight:600}
ul{margin:6px 0 10px;padding-left:22px}
li{margin:2px 0}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;background:var(--soft);
padding:1px 4px;border-radius:3px}
pre{background:var(--soft);border:1px solid var(--line);border-radius:4px;padding:8px 10px;white-space:pre-wrap;
overflow-wrap:anywhere}
details{margin:8px 0}
summary{cursor:pointer;color:var(--accent)}
pre code{background:none;padding:0}
.nw{white-space:nowrap}
figure{margin:12px 0 20px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:3px;display:block}
figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.na{color:var(--muted);background:var(--soft);border-left:4px solid #aab3c2;padding:6px 10px}
.note{color:var(--warn);background:#fff6ea;border-left:4px solid #e0a040;padding:6px 10px}
.status td:first-child{width:1.5em;text-align:center}
footer{margin-top:48px;color:var(--muted);font-size:12.5px;border-top:1px solid var(--line);padding-top:10px}
"""


def page(title: str, meta: Sequence[str], contents: Sequence[tuple[str, str]], body: Iterable[Any],
         generated: str) -> str:
    """The whole document: head with the inline style, a header, the contents list, sections and a footer.

    Args:
        title: page title (also the ``<h1>``).
        meta: lines under the title (work folder, dataset, ...).
        contents: ``(anchor, title)`` of each section, for the contents list.
        body: the sections (HTML).
        generated: the generation time (the only part of the page that changes between identical runs).
    """
    nav = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in contents)
    lines = "".join(f'<div class="meta">{esc(m)}</div>' for m in meta)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body><main>"
            f"<header><h1>{esc(title)}</h1>{lines}"
            f'<div class="meta">generated <span id="generated">{esc(generated)}</span></div></header>'
            f"<nav><ul>{nav}</ul></nav>{join(body)}"
            "<footer>Written by <code>autoseg report</code>. Self-contained: every figure is embedded in this file."
            "</footer></main></body></html>\n")
