"""The words of the web pages, one catalogue per language.

Each catalogue maps a key to a text with ``{name}`` placeholders; both
catalogues have the same keys and the same placeholders (a unit test checks
it).  Templates and page code look texts up by key
(:class:`policyd.web.render.Texts`), so a wording is changed, or a language
added, in one place.
"""

from __future__ import annotations

from policyd.web.texts import en, fr

#: Catalogue of each page language.
CATALOGUES: dict[str, dict[str, str]] = {"en": en.TEXTS, "fr": fr.TEXTS}
