"""The project's guidelines for annotators (`--instructions FILE.md`), rendered to safe HTML.

A small Markdown subset, enough for guidelines: headings (#), paragraphs, bullet and numbered lists,
**bold**, *italic*, `code` and [links](https://...). Everything is HTML-escaped first, so a guideline
file can never inject markup or scripts; links are kept only for http(s) and relative targets.
"""
from __future__ import annotations

import hashlib
import re

from markupsafe import Markup, escape

_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*]+)\*(?!\*)"), r"<em>\1</em>"),
]
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _inline(text: str) -> str:
    html = str(escape(text))
    for pattern, replacement in _INLINE:
        html = pattern.sub(replacement, html)

    def link(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"^(https?://|/|#|\.)", target) or "://" not in target and ":" not in target:
            return f'<a href="{target}" target="_blank" rel="noopener">{label}</a>'
        return label

    return _LINK.sub(link, html)


def render_markdown(text: str) -> Markup:
    """The guidelines as HTML (escaped: no markup from the file survives)."""
    blocks, paragraph, items, list_tag = [], [], [], None

    def flush() -> None:
        nonlocal paragraph, items, list_tag
        if paragraph:
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
        if items:
            blocks.append(f"<{list_tag}>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + f"</{list_tag}>")
        paragraph, items, list_tag = [], [], None

    for line in text.splitlines():
        stripped = line.strip()
        heading = re.match(r"^(#{1,4})\s+(.*)$", stripped)
        bullet = re.match(r"^[-*+]\s+(.*)$", stripped)
        numbered = re.match(r"^\d+[.)]\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = min(len(heading.group(1)) + 1, 5)  # the panel's own title is the h2
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif bullet or numbered:
            tag = "ul" if bullet else "ol"
            if paragraph or (list_tag and list_tag != tag):
                flush()
            list_tag = tag
            items.append((bullet or numbered).group(1))
        elif items:
            items[-1] += " " + stripped
        else:
            paragraph.append(stripped)
    flush()
    return Markup("\n".join(blocks))


def instructions_version(text: str) -> str:
    """A short fingerprint of the guidelines: an annotator sees them again when they change."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
