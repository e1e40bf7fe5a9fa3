"""Markdown of model output, rendered on the server and sanitised: model output is
attacker-controlled (a prompt injection can make it write any HTML or link).

markdown-it renders CommonMark, and the pipe tables models write (GitHub's syntax), with raw
HTML turned off (it is shown as text); images become plain links, so nothing remote is loaded
without the user's click; nh3 then keeps only a small set of tags and attributes, only
http(s)/mailto links, and gives every link `rel="noopener noreferrer nofollow"` and
`target="_blank"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nh3
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.token import Token

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "code", "pre", "blockquote",
    "ul", "ol", "li", "a", "h1", "h2", "h3", "h4", "h5", "h6",
    "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
# A table column's alignment, as a class: the Content-Security-Policy refuses style attributes.
ALIGN_CLASSES = {"align-left", "align-center", "align-right"}
URL_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"


def _image_as_link(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """`![alt](url)` becomes a link to the image: loading it is the user's choice."""
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    alt = "".join(child.content for child in token.children or []) or "image"
    return f'<a href="{escape(src)}">{escape("Image: " + alt)}</a>'


def _cell_open(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """A table cell aligned by its column (`|--:|`) says so with a class, not a style."""
    token = tokens[idx]
    style = str(token.attrGet("style") or "")
    if style:
        token.attrs.pop("style", None)
        token.attrSet("class", "align-" + style.removeprefix("text-align:"))
    return str(renderer.renderToken(tokens, idx, options, env))


def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _image_as_link)
    md.add_render_rule("th_open", _cell_open)
    md.add_render_rule("td_open", _cell_open)
    return md


_md = _renderer()


def sanitize(html: str) -> str:
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        clean_content_tags={"script", "style"},
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel=LINK_REL,
        set_tag_attribute_values={"a": {"target": "_blank"}},
        tag_attribute_values={cell: {"class": ALIGN_CLASSES} for cell in ("th", "td")},
    )


def render_markdown(text: str) -> SafeString:
    """Untrusted markdown (assistant output) as safe HTML."""
    return mark_safe(sanitize(_md.render(text or "")))  # noqa: S308 - sanitised just above


def render_plain(text: str) -> SafeString:
    """Untrusted plain text (a user's message): escaped, line breaks kept."""
    return mark_safe(escape(text or "").replace("\n", "<br>"))  # noqa: S308 - escaped
