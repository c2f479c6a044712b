"""Pages from templates, in the reader's language.

Every page of the HTTP listener is a Jinja2 template under
``policyd/web/templates`` (shipped in the wheel), rendered with
autoescaping on: whatever came from outside (account names, reasons,
headers of a held message) is escaped wherever a template shows it.  The
words are not in the templates but in one catalogue per language
(:mod:`policyd.web.texts`), looked up with ``t("key", name=value)``; the
language is chosen from the browser's ``Accept-Language``
(:func:`choose_language`) and declared in ``<html lang>``.
"""

from __future__ import annotations

import datetime
from typing import Any

import jinja2
from markupsafe import Markup, escape
from twisted.web.server import Request

from policyd.quarantine.digest import show_time
from policyd.web.texts import CATALOGUES

#: An answer: status, content type, body.
Answer = tuple[int, str, bytes]

HTML = "text/html; charset=utf-8"

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("policyd.web", "templates"),
    autoescape=True,
    # A misspelt name in a template fails the page (and its test) instead of showing nothing.
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def choose_language(accept: str | None, default: str = "en") -> str:
    """The page language from ``Accept-Language``: the preferred one of en and fr, else ``default``."""
    best: tuple[float, int, str] | None = None
    for position, part in enumerate((accept or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        language = tag.strip().lower().split("-")[0]
        if language in CATALOGUES and quality > 0:
            candidate = (-quality, position, language)
            if best is None or candidate < best:
                best = candidate
    return best[2] if best is not None else default


def request_language(request: Request, default: str = "en") -> str:
    """The language of the page answering ``request`` (its ``Accept-Language``, else ``default``)."""
    # Read as bytes: a header that is not UTF-8 picks no language, it is no error.
    accept = (request.getHeader(b"accept-language") or b"").decode("ascii", "replace")
    # The answer depends on the header: caches must keep one copy per language.
    request.setHeader("vary", "Accept-Language")
    return choose_language(accept, default)


class Texts:
    """The words of one language: ``texts("key", name=value)`` is the text filled in.

    :param language: ``en`` or ``fr``.
    """

    def __init__(self, language: str) -> None:
        self.language = language
        self._texts = CATALOGUES[language]

    def __call__(self, key: str, **values: Any) -> str:
        return self._texts[key].format(**values) if values else self._texts[key]

    def __contains__(self, key: str) -> bool:
        return key in self._texts

    def when(self, timestamp: float, zone: bool = True) -> str:
        """A time in the server's time zone, written the language's way, the zone named."""
        shown = show_time(timestamp, self.language)
        if not zone:
            return shown
        return f"{shown} {datetime.datetime.fromtimestamp(timestamp).astimezone().strftime('%Z')}"


def render(template: str, language: str, **context: Any) -> bytes:
    """The page ``template`` in ``language``, ``context`` given to the template.

    The template sees ``t`` (the language's :class:`Texts`), ``language``,
    and ``marked(text)``: the text escaped, the Subject tag ``tag`` (when the
    context has one) kept on one line.
    """
    texts = Texts(language)
    tag = context.get("tag")

    def marked(text: str) -> Markup:
        shown = escape(text)
        if not tag:
            return shown
        return shown.replace(escape(tag), Markup('<span class="tag">{}</span>').format(tag))

    return _ENVIRONMENT.get_template(template).render(t=texts, language=language, marked=marked, **context).encode()


def page(status: int, template: str, language: str, **context: Any) -> Answer:
    """An HTML answer: ``status`` and the rendered ``template``."""
    return status, HTML, render(template, language, **context)


def message_page(status: int, language: str, title: str, text: str, role: str = "alert",
                 css: str | None = None, index: bool = True) -> Answer:
    """A page that says one thing: a title and a paragraph.

    :param role: ``alert`` for an error, ``status`` for news.
    :param css: its look (``error``, ``ok``, or empty); default: from ``role``.
    :param index: whether search engines may index it.
    """
    if css is None:
        css = "ok" if role == "status" else "error"
    return page(status, "message.html", language, title=title, text=text, role=role, css=css, index=index)
