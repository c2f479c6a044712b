"""What the classifier sees of a message: MIME, encodings, HTML, URLs, French and English."""

from __future__ import annotations

import base64
import mailbox
from email.message import EmailMessage
from pathlib import Path

from policyd import content


def french_html() -> bytes:
    """A base64 HTML newsletter in French with an RFC 2047 Subject and an attachment."""
    message = EmailMessage()
    message["From"] = "Boutique <promo@offres.example.fr>"
    message["To"] = "client@example.org"
    message["Subject"] = "Félicitations, vous avez gagné un iPhone !"
    message.set_content("Cliquez ici pour réclamer votre cadeau gratuit.", charset="utf-8")
    message.add_alternative(
        "<html><style>p{color:red}</style><body><p>Cliquez <a href='https://win.promo.example.co.uk/x?id=1'>ici</a>"
        " &eacute;t&eacute; <b>GRATUIT</b></p><script>alert(1)</script>"
        "<img src='http://198.51.100.4/pixel.gif'></body></html>",
        subtype="html",
        charset="utf-8",
        cte="base64",
    )
    message.add_attachment(b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename="facture.exe")
    return message.as_bytes()


def test_decodes_mime_html_and_headers() -> None:
    """Base64 HTML is decoded and reduced to text; the encoded Subject is decoded; scripts and styles dropped."""
    features = content.extract(french_html())
    assert features.subject == "Félicitations, vous avez gagné un iPhone !"
    tokens = set(features.tokens)
    assert {"cliquez", "réclamer", "reclamer", "gratuit", "été", "ete"} <= tokens
    assert {"subject:gagné", "subject:gagne", "subject:iphone"} <= tokens
    assert "from-domain:example.fr" in tokens and "from:boutique" in tokens
    assert "alert" not in tokens and "color" not in tokens
    assert "gratuit" in features.text and "félicitations" in features.text
    assert features.text == features.text.lower()


def test_urls_their_domains_and_structure() -> None:
    """Links give host and registered-domain tokens; an IP host, the attachment type and parts are noted."""
    tokens = set(content.extract(french_html()).tokens)
    assert "url:win.promo.example.co.uk" in tokens
    assert "url-domain:example.co.uk" in tokens
    assert "url:https" in tokens and "url:ip-address" in tokens
    assert "attachment:exe" in tokens
    assert {"part:multipart/mixed", "part:text/html", "html:a", "html:img"} <= tokens


def test_english_plain_text_words_and_pairs() -> None:
    """Plain text gives lower-cased words and word pairs; header names are tokens."""
    raw = (
        b"From: Bob <bob@example.net>\r\nSubject: Meeting notes\r\nX-Mailer: Thunderbird 115\r\n\r\n"
        b"Please find the MEETING notes below. Don't forget the budget review.\r\n"
    )
    tokens = set(content.extract(raw).tokens)
    assert {"please", "meeting", "notes", "don't", "budget", "budget review"} <= tokens
    assert {"hdr:x-mailer", "mailer:thunderbird", "subject:meeting"} <= tokens


def test_ignores_forgeable_verdict_headers() -> None:
    """X-Spam-* and our own headers never become tokens: senders could forge them."""
    raw = b"X-Spam-Status: No, score=-100\r\nX-Policyd-Network: score=0\r\nSubject: hi\r\n\r\nhello\r\n"
    tokens = content.extract(raw).tokens
    assert not [t for t in tokens if "x-spam" in t or "policyd" in t]


def test_bad_charsets_and_broken_mime_never_raise() -> None:
    """An unknown charset, broken base64 and a missing boundary are read as well as can be."""
    raw = (
        b"Subject: =?x-unknown?Q?caf=E9?=\r\nContent-Type: multipart/mixed; boundary=nope\r\n\r\n"
        b"--other\r\nContent-Type: text/plain; charset=no-such-charset\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n"
    )
    features = content.extract(raw)
    assert isinstance(features.tokens, tuple)
    assert content.decode_header("=?utf-8?B?bm90IGJhc2U2NA?=") in ("=?utf-8?B?bm90IGJhc2U2NA?=", "not base64")


def test_latin1_body_without_declared_charset() -> None:
    """8-bit text in a declared latin-1 part decodes to accented words."""
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nR\xe9sum\xe9 de la r\xe9union\r\n"
    assert {"résumé", "resume", "réunion"} <= set(content.extract(raw).tokens)


def test_bounds_on_a_hostile_message() -> None:
    """Thousands of parts and words stay within the bounds."""
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\nword{n}\r\n" for n in range(500))
    raw = f"Content-Type: multipart/mixed; boundary=b\r\n\r\n{parts}--b--\r\n".encode()
    features = content.extract(raw)
    assert "meta:too-many-parts" in features.tokens
    long = b"Subject: x\r\n\r\n" + b" ".join(b"w%d" % n for n in range(50_000))
    features = content.extract(long)
    assert len(features.tokens) <= content.MAX_TOKENS
    assert len(features.text) <= content.TEXT_CHARS
    assert len(content.extract(long, max_bytes=1000).text) < 1000


def test_registered_domains() -> None:
    """Registered domains keep country second levels."""
    assert content.registered_domain("a.b.example.com") == "example.com"
    assert content.registered_domain("shop.example.co.uk") == "example.co.uk"
    assert content.registered_domain("www.impots.gouv.fr") == "impots.gouv.fr"
    assert content.domain_of("HTTPS://user@Mail.Example.org:8080/path?q") == "mail.example.org"


def test_read_mail_from_maildir_folder_and_mbox(tmp_path: Path) -> None:
    """Maildir (cur and new, not tmp), folders of files (recursively) and mbox files are read."""
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=True)
    maildir.add(b"Subject: one\r\n\r\nbody one\r\n")
    (tmp_path / "Maildir" / "tmp" / "partial").write_bytes(b"Subject: partial\r\n\r\n")
    folder = tmp_path / "folder" / "sub"
    folder.mkdir(parents=True)
    (folder / "a.eml").write_bytes(b"From someone@example.net Tue Aug  6 11:51:02 2002\nSubject: a\n\nx\n")
    (folder / ".hidden").write_bytes(b"Subject: hidden\n\n")
    box = mailbox.mbox(tmp_path / "box.mbox")
    box.add(b"Subject: m1\n\nFrom here on\n")
    box.add(b"Subject: m2\n\ntwo\n")
    box.close()
    single = tmp_path / "single.eml"
    single.write_bytes(b"Subject: s\r\n\r\nalone\r\n")

    maildir_found = list(content.read_mail(tmp_path / "Maildir"))
    assert [raw.split(b"\r\n")[0] for _, raw in maildir_found] == [b"Subject: one"]
    folder_found = list(content.read_mail(tmp_path / "folder"))
    assert [raw for _, raw in folder_found] == [b"Subject: a\n\nx\n"]
    mbox_found = list(content.read_mail(tmp_path / "box.mbox"))
    assert [raw.split(b"\n")[0] for _, raw in mbox_found] == [b"Subject: m1", b"Subject: m2"]
    assert b"From here on" in mbox_found[0][1]
    assert [w for w, _ in content.read_mail(single)] == [str(single)]


def test_html_to_text_keeps_links_and_visible_text() -> None:
    """Comments, scripts and tags go; entities are decoded; links are returned."""
    text, links, tags = content.html_to_text(
        "<p>Bonjour&nbsp;<!-- hidden --><a href=\"http://x.example/\">lien</a></p><script>evil()</script>"
    )
    assert "Bonjour" in text and "lien" in text and "hidden" not in text and "evil" not in text
    assert links == ["http://x.example/"] and "a" in tags


def test_base64_text_part() -> None:
    """A base64 text/plain part is decoded before tokenising."""
    body = base64.b64encode("Offre spéciale réservée".encode()).decode()
    raw = (
        "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + body + "\r\n"
    ).encode()
    assert {"offre", "spéciale", "speciale", "réservée"} <= set(content.extract(raw).tokens)
