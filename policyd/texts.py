"""Texts for people: reply and notification templates, and outside text made safe to show.

Templates are ``string.Template`` files (``$account``, ``$limit``) under
``policyd/templates/<language>/``; a directory named by the ``templates`` key
overrides any of them.  Values are sanitised when the text becomes a reply.

:func:`printable` is the one rule for text that came from outside (subjects,
senders, reasons, account names) on its way to a terminal or a log line.
"""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

from policyd.errors import ConfigError

LANGUAGES = ("en", "fr")


def printable(text: str, keep: str = "") -> str:
    r"""``text`` with every character a terminal could act on written out as ``\x{hex}``.

    Replaced: whatever :meth:`str.isprintable` refuses, that is the C0 and C1
    controls and DEL (escape sequences: a screen clear, an OSC 52 clipboard
    write, CR and backspace that overwrite what was shown), the format
    characters (bidi overrides such as U+202E, which reorder a line; also
    the zero-width joiner), spaces other than the ASCII one, line and
    paragraph separators, surrogates (bytes that were not UTF-8) and code
    points not assigned yet.  ``\x{1b}`` is plain ASCII, so the terminal
    only shows it, and it names the character that was there.

    :param keep: characters left as they are (``"\n\t"`` for a message body
        printed as lines).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else f"\\x{{{ord(c):x}}}" for c in text)


class Texts:
    """Loads each template once and fills it in.

    :param language: ``en`` or ``fr``.
    :param override: a directory whose ``<language>/<name>.txt`` files win.
    :raises ConfigError: when a template is missing or unreadable.
    """

    def __init__(self, language: str = "en", override: str | None = None) -> None:
        self.language = language
        self.override = override
        self._cache: dict[str, string.Template] = {}

    def template(self, name: str) -> string.Template:
        """The template called ``name`` in this language."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        text = None
        if self.override:
            path = Path(self.override) / self.language / f"{name}.txt"
            if path.exists():
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as error:
                    raise ConfigError(f"templates: cannot read {path}: {error}") from None
        if text is None:
            shipped = resources.files("policyd") / "templates" / self.language / f"{name}.txt"
            try:
                text = shipped.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError(f"templates: no template {name!r} for {self.language}") from None
        template = string.Template(text.strip())
        self._cache[name] = template
        return template

    def render(self, name: str, **values: object) -> str:
        """Fill in a template; unknown ``$names`` are left as written."""
        return self.template(name).safe_substitute({k: str(v) for k, v in values.items()})
