"""What the classifier sees of a message: MIME, encodings, HTML, URLs, French and English."""

from __future__ import annotations

import base64
import mailbox
import random
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from policyd.content import features as content


def words(features: content.Features) -> set[str]:
    """The words the classifier takes from a message's text, with their unaccented forms."""
    return set(content.text_words(features.text)) | set(content.text_words(content.unaccented(features.text)))


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
    found = words(features)
    assert {"cliquez", "réclamer", "reclamer", "gratuit", "été", "ete", "gagné", "gagne", "iphone"} <= found
    assert "from-domain:example.fr" in features.tokens
    assert b"From: Boutique <promo@offres.example.fr>\n" in features.head
    assert "alert" not in found and "color" not in found
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


def test_english_plain_text_words_and_the_header_block() -> None:
    """Plain text gives lower-cased words (Subject first); header names are tokens; the header block is kept."""
    raw = (
        b"From: Bob <bob@example.net>\r\nSubject: Meeting notes\r\nX-Mailer: Thunderbird 115\r\n\r\n"
        b"Please find the MEETING notes below. Don't forget the budget review.\r\n"
    )
    features = content.extract(raw)
    assert content.text_words(features.text) == [
        "meeting", "notes", "please", "find", "the", "meeting", "notes", "below", "don", "forget", "the", "budget",
        "review"]
    assert {"hdr:x-mailer", "hdr:subject", "from-domain:example.net"} <= set(features.tokens)
    assert features.head == b"From: Bob <bob@example.net>\nSubject: Meeting notes\nX-Mailer: Thunderbird 115"


def test_french_accents_and_elisions() -> None:
    """French words keep their accents (NFC or not), elided articles come off, typographic apostrophes too.

    A word is two bytes at least: ``à`` is one, ``l`` and ``d`` are not."""
    raw = (
        "Subject: Gagnez de l'argent\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Qu'il vienne d\u2019\u00eatre s\u00fbr : l\u2019offre \u00ab exceptionnelle \u00bb "
        "e\u0301te\u0301 \u00e0 C\u00d4T\u00c9 de l\u2019\u00e9t\u00e9 \ufb01n jusqu'\u00e0 "
        "\uff27\uff32\uff21\uff34\uff35\uff29\uff34 \U0001f4b0\u00a0aujourd'hui\r\n"
    ).encode()
    features = content.extract(raw)
    found = content.text_words(features.text)
    assert found == ["gagnez", "de", "argent", "qu", "il", "vienne", "être", "sûr", "offre", "exceptionnelle",
                     "été", "à", "côté", "de", "été", "fin", "jusqu", "à", "gratuit", "aujourd", "hui"]
    assert {"etre", "sur", "ete", "cote"} <= words(features)
    assert "\u2019" not in features.text and "\U0001f4b0" not in features.text


def test_plain_text_is_what_the_classifier_splits() -> None:
    """plain_text lower-cases, NFKC-normalises and blanks what is neither ASCII nor part of a word."""
    assert content.plain_text("L\u2019\u00c9T\u00c9 \u00bbx\u00ab \u2014 \ufb01") == "l'été \"x\" - fi"
    assert content.plain_text("caf\u00e9\u2122 \u20ac5") == "caf\u00e9tm  5"
    assert content.plain_text("ASCII Only!") == "ascii only!"


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
    assert {"résumé", "resume", "réunion"} <= words(content.extract(raw))


def test_bounds_on_a_hostile_message() -> None:
    """Thousands of parts and words stay within the bounds."""
    parts = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\nword{n}\r\n" for n in range(500))
    raw = f"Content-Type: multipart/mixed; boundary=b\r\n\r\n{parts}--b--\r\n".encode()
    features = content.extract(raw)
    assert "meta:too-many-parts" in features.tokens
    long = b"Subject: x\r\n\r\n" + b" ".join(b"w%d" % n for n in range(50_000))
    features = content.extract(long)
    assert len(features.tokens) <= content.MAX_TOKENS
    assert len(features.text) <= content.WORD_CHARS
    assert len(content.extract(long, max_bytes=1000).text) < 1000
    headers = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 100) for n in range(150))
    assert len(content.extract(headers + b"\r\nbody\r\n").head) == content.HEAD_BYTES


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


def test_message_paths_are_the_message_files(tmp_path: Path) -> None:
    """The strings policyd score walks are the files training reads, in the same order."""
    for folder in ("a", "a/.hidden", "a/tmp", "b", "box/cur", "box/new", "box/tmp"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    for file in ("a/2", "a/1", "a/.x", "a/tmp/3", "a/.hidden/4", "b/5", "box/cur/7", "box/new/6", "box/tmp/8"):
        (tmp_path / file).write_bytes(b"Subject: x\n\n")
    for root in (tmp_path, tmp_path / "box"):
        assert list(content.message_paths(str(root))) == [str(p) for p in content.message_files(root)]
    assert [p[len(str(tmp_path)) + 1 :] for p in content.message_paths(str(tmp_path))] == [
        "a/1", "a/2", "b/5", "box/cur/7", "box/new/6"]


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
    assert {"offre", "spéciale", "speciale", "réservée"} <= words(content.extract(raw))


# --- the milter's way in: header fields and body, without the email parser for one part ---------


def single_part_messages() -> list[tuple[str, bytes]]:
    """Single-part messages of every common kind, as files have them (LF line ends)."""
    qp = "Caf=C3=A9 cr=C3=A8me, offre sp=C3=A9ciale =\n(suite) pour vous\n"
    html = "<html><body><p>Cliquez <a href='https://promo.example.biz/go'>ICI</a> &eacute;t&eacute;</p></body></html>"
    return [
        ("no content-type", b"From: a@example.net\nSubject: hi\n\nPlain words, plain text. Don't forget.\n"),
        ("text/plain utf-8 8bit", "Subject: Réunion\nContent-Type: text/plain; charset=utf-8\n"
         "Content-Transfer-Encoding: 8bit\n\nRésumé de la réunion, été 2026.\n".encode()),
        ("quoted-printable", f"Subject: x\nContent-Type: text/plain;\n charset=\"UTF-8\"\n"
         f"Content-Transfer-Encoding: quoted-printable\n\n{qp}".encode()),
        ("base64 html", b"Subject: x\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
         + base64.encodebytes(html.encode())),
        ("latin-1", b"Subject: x\nContent-Type: text/plain; charset=iso-8859-1\n\nR\xe9sum\xe9 \xe9t\xe9\n"),
        ("unknown charset", b"Subject: x\nContent-Type: text/plain; charset=no-such-charset\n\nbody text\n"),
        ("attachment only", b"Subject: x\nContent-Type: application/pdf; name=\"facture.pdf\"\n"
         b"Content-Disposition: attachment; filename=\"facture.pdf\"\nContent-Transfer-Encoding: base64\n\n"
         b"JVBERi0xLjQK\n"),
        ("8-bit header", "Subject: gagné\nContent-Type: text/plain; name=\"résumé.txt\"\n\nmot\n".encode()),
        ("bad content-type", b"Subject: x\nContent-Type: garbage\n\nstill text\n"),
        ("image", b"Subject: x\nContent-Type: image/gif\nContent-Transfer-Encoding: base64\n\nR0lGODlhAQABAAAAACw=\n"),
        ("uuencode", b"Subject: x\nContent-Type: text/plain\nContent-Transfer-Encoding: x-uuencode\n\n"
         b"begin 644 a.txt\n#86)C\n`\nend\n"),
    ]


@pytest.mark.parametrize(("kind", "raw"), single_part_messages(), ids=[k for k, _ in single_part_messages()])
def test_single_part_without_the_email_parser_gives_the_same_features(kind: str, raw: bytes) -> None:
    """A single part read directly gives exactly what the email parser's walk gives."""
    headers, body = content.split_message(raw)
    fast = content.message_features(headers, body)
    assert fast == content.message_features(headers, body, mime_parser=True)
    assert fast == content.extract(raw)


def test_random_single_part_messages_agree_with_the_email_parser() -> None:
    """Seeded random bodies, encodings and charsets: the direct way and the email parser agree."""
    pick = random.Random(20261125)
    pieces = ["word", "Mot", "été", "l'offre", "e-mail", "v1.2", "http://x.example/a", "<b>gras</b>", "=3D", "\t",
              "  ", "\r\n", "\n", ".", "---", "€", "\udcff", "ÉTÉ", "FREE!!!", "a", "_", "é" * 40]
    for _ in range(300):
        text = "".join(pick.choice(pieces) for _ in range(pick.randint(0, 60)))
        ctype = pick.choice(["", "text/plain", "text/html", "text/plain; charset=iso-8859-1",
                             "text/plain; charset=utf-8", "application/octet-stream; name=x.exe", "text"])
        encoding = pick.choice(["", "7bit", "8bit", "quoted-printable", "base64"])
        data = text.encode("utf-8", "surrogateescape")
        if encoding == "base64":
            data = base64.encodebytes(data)
        headers = [("Subject", "x")]
        if ctype:
            headers.append(("Content-Type", ctype))
        if encoding:
            headers.append(("Content-Transfer-Encoding", encoding))
        fast = content.message_features(headers, data)
        assert fast == content.message_features(headers, data, mime_parser=True), (headers, data)


def test_the_milter_and_training_see_the_same_features() -> None:
    """Header fields as Postfix sends them (no space after the colon, folds as LF) and a CRLF body
    give the features the file of the same message gives."""
    raw = french_html()
    headers, body = content.split_message(raw)
    as_postfix = [(name, value.replace("\r\n", "\n")) for name, value in headers]
    assert content.message_features(as_postfix, body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) == \
        content.extract(raw)


def test_split_message_reads_headers_as_postfix_does() -> None:
    """One space after the colon goes, folds join with LF, blanks before the colon are allowed, a line that
    is no header starts the body, an mbox From line is skipped, LF and CRLF alike."""
    raw = (b"From sender@example.net Tue Aug  6 11:51:02 2002\r\n"
           b"Subject:  two spaces\r\nTo: a@example.org,\r\n\tb@example.org\r\nX-Odd :value\r\n"
           b"not a header line\r\nbody line\r\n")
    headers, body = content.split_message(raw)
    assert headers == [("Subject", " two spaces"), ("To", "a@example.org,\n\tb@example.org"), ("X-Odd", "value")]
    assert body == b"not a header line\r\nbody line\r\n"
    assert content.split_message(b"Subject: x\n\nbody\n") == ([("Subject", "x")], b"body\n")
    assert content.split_message(b"Subject: x") == ([("Subject", "x")], b"")
    assert content.split_message(b"\nonly a body\n") == ([], b"only a body\n")
    assert content.split_message(b"Subject: caf\xc3\xa9 \xff\n\n")[0] == [("Subject", "café \udcff")]


def test_hostile_markup_and_structure_take_linear_time() -> None:
    """Thousands of unclosed comments, scripts and tags, or of nested parts, are read in a blink, not seconds."""
    for markup in ("<" * 60_000, "<!--" * 15_000, "<script " * 7_500, "<sTyle" * 10_000):
        started = time.process_time()
        content.html_to_text(markup)
        assert time.process_time() - started < 1.0, markup[:10]
    nested = b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (n, n + 1) for n in range(5000))
    started = time.process_time()
    features = content.extract(b"Content-Type: multipart/mixed; boundary=b0\n\n" + nested)
    assert time.process_time() - started < 2.0
    assert "meta:too-many-parts" in features.tokens


def test_hidden_markup_is_dropped_like_a_browser_does() -> None:
    """A comment, script or style left open hides the rest; a lone '<' is text; case does not matter."""
    text, _, _ = content.html_to_text("a < b <B>bold</b><SCRIPT type=x>x()</Script >shown<!-- open forever <p>hidden")
    assert text.split() == ["a", "<", "b", "bold", "shown"]


def multipart_messages() -> list[tuple[str, bytes]]:
    """Messages with parts of every common structure, and a few odd ones."""
    forwarded = b"From: a@example.net\nSubject: inner\nContent-Type: text/plain\n\ninner words\n"
    return [
        ("alternative, attachment, CRLF", french_html()),
        ("preamble, epilogue, blanks after the delimiter",
         b"Content-Type: multipart/mixed; boundary=\"b 1\"\n\npreamble\n--b 1  \nContent-Type: text/plain\n\n"
         b"first\r\nx\n\n--b 1\n\nno headers\n--b 1--\nepilogue\n"),
        ("nested", b"Content-Type: multipart/mixed; boundary=out\n\n--out\nContent-Type: multipart/alternative;\n"
         b" boundary=in\n\n--in\nContent-Type: text/plain\n\nplain\n--in\nContent-Type: text/html\n\n<b>html</b>\n"
         b"--in--\n--out\nContent-Type: image/png; name=x.png\nContent-Transfer-Encoding: base64\n\niVBORw==\n"
         b"--out--\n"),
        ("forwarded message", b"Content-Type: multipart/mixed; boundary=f\n\n--f\n\nsee below\n--f\n"
         b"Content-Type: message/rfc822\n\n" + forwarded + b"--f--\n"),
        ("digest", b"Content-Type: multipart/digest; boundary=d\n\n--d\n\n" + forwarded + b"--d--\n"),
        ("RFC 2231 file name", b"Content-Type: multipart/mixed; boundary=r\n\n--r\nContent-Type: text/plain;\n"
         b" charset*=utf-8''x\nContent-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.txt\n\nx\n--r--\n"),
        ("quoted-printable and latin-1 parts", b"Content-Type: multipart/mixed; boundary=q\n\n--q\n"
         b"Content-Type: text/plain; charset=\"ISO-8859-1\"\nContent-Transfer-Encoding: quoted-printable\n\n"
         b"R=E9sum=E9 =\nsuite\n--q\nContent-Type: text/plain; charset=iso-8859-1\n\n\xe9t\xe9\n--q--"),
        ("a longer boundary is not the boundary", b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n"
         b"--bb\nstill one\n--b--\n"),
        ("boundary never found", b"Content-Type: multipart/mixed; boundary=nope\n\n--other\n\ntext\n"),
        ("no boundary", b"Content-Type: multipart/mixed\n\nplain words\n"),
        ("no closing delimiter", b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nopen to the end\n"),
        ("delivery report", b"Content-Type: multipart/report; boundary=r\n\n--r\n\nfailed\n--r\n"
         b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\nAction: failed\n--r--\n"),
    ]


@pytest.mark.parametrize(("kind", "raw"), multipart_messages(), ids=[k for k, _ in multipart_messages()])
def test_parts_read_directly_give_what_the_email_parser_gives(kind: str, raw: bytes) -> None:
    """A body split on its boundary directly gives exactly the features of the email parser's walk."""
    headers, body = content.split_message(raw)
    assert content.message_features(headers, body) == content.message_features(headers, body, mime_parser=True)


def test_headers_without_an_empty_line_after_them() -> None:
    """A message that is all headers, or whose headers end at a line that is no field, splits as before."""
    assert content.split_message(b"Subject: x\r\nTo: y\r\n") == ([("Subject", "x"), ("To", "y")], b"")
    assert content.split_message(b"Subject: x\n\tfolded\nbody line\n\nmore\n") == (
        [("Subject", "x\n\tfolded")], b"body line\n\nmore\n")
    assert content.split_message(b"\tblank first\n\nbody\n") == ([], b"\tblank first\n\nbody\n")


def test_header_name_tokens_once_each_in_order_long_names_cut() -> None:
    """hdr: tokens: lower-cased, each name once in the order of first appearance, cut to 40 characters."""
    long = "X-" + "Long" * 15
    headers = [("Received", "a"), ("X-Mailer", "m"), ("received", "b"), ("Subject", "s")]
    found = [t for t in content.message_features(headers, b"hi").tokens if t.startswith("hdr:")]
    assert found == ["hdr:received", "hdr:x-mailer", "hdr:subject"]
    found = [t for t in content.message_features([*headers, (long, "v"), (long, "w")], b"hi").tokens
             if t.startswith("hdr:")]
    assert found == ["hdr:received", "hdr:x-mailer", "hdr:subject", "hdr:" + long.lower()[:40]]
    # A name with a line end in it (never from an MTA) is still one name.
    found = [t for t in content.message_features([("X-A\nB", "v"), ("Subject", "s")], b"hi").tokens
             if t.startswith("hdr:")]
    assert found == ["hdr:x-a\nb", "hdr:subject"]
    assert not [t for t in content.message_features([], b"hi").tokens if t.startswith("hdr:")]


def test_link_tokens_of_a_host_and_of_each_link() -> None:
    """A host's tokens are the same from every link to it; https and user info are told link by link."""
    body = (b"see http://a.example.co.uk/x and https://a.example.co.uk/y and http://user@b.example.com/ "
            b"and http://192.0.2.1/z and http://localhost/\n")
    tokens = content.message_features([("Subject", "s")], body).tokens
    assert [t for t in tokens if t.startswith("url")] == [
        "url:a.example.co.uk", "url-domain:example.co.uk", "url:https", "url:b.example.com",
        "url-domain:example.com", "url:userinfo", "url:ip-address",
    ]


def test_a_large_encoded_text_part_is_decoded_from_its_start_alike() -> None:
    """A text part far beyond PART_BYTES, quoted-printable or base64 (CRLF or LF lines, HTML or plain):
    decoding only its start gives the features decoding it all gives (the email parser's)."""
    import binascii

    from policyd.content import mime

    pick = random.Random(20261203)
    words = ["été", "offre", "=", "gratuit", "€", "<b>x</b>", "http://a.example/p?q=1", "\t", "ÀÉÎ", "."]
    text = " ".join(pick.choice(words) for _ in range(40_000)).encode()
    for ctype in ("text/plain; charset=utf-8", "text/html; charset=utf-8"):
        for encoding, data in (("quoted-printable", binascii.b2a_qp(text)), ("base64", base64.encodebytes(text))):
            for body in (data, data.replace(b"\n", b"\r\n")):
                assert len(body) > 4 * content.PART_BYTES
                headers = [("Subject", "x"), ("Content-Type", ctype), ("Content-Transfer-Encoding", encoding)]
                fast = content.message_features(headers, body)
                assert fast == content.message_features(headers, body, mime_parser=True), (ctype, encoding)
                part = mime.Part(dict((n.lower(), v) for n, v in headers), body)
                for limit in (1, 100, 1000, content.PART_BYTES):
                    assert part.payload(limit)[:limit] == part.payload()[:limit]


def test_damaged_or_short_encodings_are_decoded_as_a_whole_would_be() -> None:
    """Quoted-printable that packs many encoded bytes a byte, base64 with junk or padding inside,
    and bodies too short to cut: the start decoded is the start of the whole."""
    from policyd.content import mime

    cases = [
        ("quoted-printable", b"=C3=A9=\n" * 20_000),  # 8 encoded bytes a byte: the start is not enough
        ("quoted-printable", b"short=3D\n"),
        ("base64", base64.encodebytes(b"x" * 50_000).replace(b"\n", b"!!\n")),  # junk in every line
        ("base64", (base64.encodebytes(b"ab") * 30_000)),  # padding at the end of every line
        ("base64", b"QUJD\n" * 20_000 + b"Q\n"),  # one character too many at the end
        ("base64", b"QUJD"),
    ]
    for encoding, body in cases:
        part = mime.Part({"content-transfer-encoding": encoding}, body)
        whole = part.payload()
        for limit in (10, 1000, content.PART_BYTES):
            start = part.payload(limit)
            if encoding == "base64" and body.endswith(b"Q\n"):
                # The whole cannot be decoded (kept as it is); its start can.
                assert start[:limit] == b"ABC" * (limit // 3) + b"ABC"[: limit % 3] or start == whole
                continue
            assert start[:limit] == whole[:limit], (encoding, body[:20], limit)
