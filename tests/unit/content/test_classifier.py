"""The classifier on small messages written here (never the evaluation corpus)."""

from __future__ import annotations

import mailbox
import random
import zlib
from pathlib import Path

import numpy as np
import pytest

from policyd.content import classifier
from policyd.content import features as content
from policyd.content.classifier import Model, ModelError

HAM_WORDS = (
    "meeting agenda budget review project report minutes colleague schedule thanks "
    "réunion ordre du jour budget rapport projet compte rendu collègue planning merci"
).split()
SPAM_WORDS = (
    "winner prize free casino viagra click unsubscribe offer cheap pills lottery "
    "gagnant gratuit cadeau offre exceptionnelle cliquez promotion crédit argent facile"
).split()


def mail(words: list[str], subject: str, url: str = "") -> bytes:
    """A small plain-text message."""
    body = " ".join(words) + (f"\nhttp://{url}/go\n" if url else "\n")
    return f"From: someone@example.net\nSubject: {subject}\n\n{body}".encode()


def corpus(seed: int = 7, each: int = 40) -> list[tuple[bytes, bool]]:
    """Ham and spam messages in French and English drawn from two vocabularies."""
    pick = random.Random(seed)
    found = []
    for n in range(each):
        ham = [pick.choice(HAM_WORDS) for _ in range(30)] + [pick.choice(SPAM_WORDS) for _ in range(2)]
        spam = [pick.choice(SPAM_WORDS) for _ in range(30)] + [pick.choice(HAM_WORDS) for _ in range(2)]
        found.append((mail(ham, f"notes {n}"), False))
        found.append((mail(spam, f"GAGNEZ {n}", url="promo.example.biz"), True))
    return found


def training_mail(directory: Path, seed: int = 5, each: int = 60) -> tuple[Path, Path]:
    """The corpus written for ``policyd train``: ham in an mbox, spam as a folder of files."""
    ham, spam = directory / "ham.mbox", directory / "spam"
    box = mailbox.mbox(ham)
    spam.mkdir()
    for n, (raw, is_spam) in enumerate(corpus(seed=seed, each=each)):
        if is_spam:
            (spam / f"{n}.eml").write_bytes(raw)
        else:
            box.add(raw)
    box.close()
    return ham, spam


@pytest.fixture(scope="module")
def model() -> Model:
    """A model trained on the small corpus (2**16 weights, fast)."""
    return classifier.train(((content.extract(raw), spam) for raw, spam in corpus()), bits=16)


def test_separates_unseen_ham_and_spam(model: Model) -> None:
    """Messages it never saw score negative (ham) and positive (spam) points."""
    for raw, spam in corpus(seed=99, each=10):
        points = model.points(content.extract(raw))
        assert (points > 0) == spam, (points, raw[:80])


def test_points_are_calibrated_log_odds(model: Model) -> None:
    """Points grow with the evidence: a clear spam scores well above an ambiguous message."""
    clear = model.points(content.extract(mail(SPAM_WORDS * 2, "GAGNEZ", "promo.example.biz")))
    mixed = model.points(content.extract(mail(SPAM_WORDS[:3] + HAM_WORDS[:3], "hello")))
    assert clear > 2 and clear > mixed
    assert model.info["ham"] == 40 and model.info["spam"] == 40


def test_explain_names_the_telling_features(model: Model) -> None:
    """The reasons of a spam score are its spam words, strongest first."""
    features = content.extract(mail(["gratuit", "casino", "cadeau"] * 3, "GAGNEZ"))
    reasons = model.explain(features, top=5)
    assert len(reasons) == 5
    assert abs(reasons[0].points) >= abs(reasons[-1].points)
    named = {r.feature for r in reasons}
    assert named & {"gratuit", "casino", "cadeau", "gagnez"} or any(n.startswith("phrase ") for n in named)


def test_save_and_load_round_trip(model: Model, tmp_path: Path) -> None:
    """A saved model scores the same after loading (float16 weights: within rounding)."""
    path = tmp_path / "sub" / "content.model"
    model.save(path)
    loaded = Model.load(path)
    assert loaded.bits == 16 and loaded.info["spam"] == 40
    for raw, _ in corpus(seed=3, each=3):
        features = content.extract(raw)
        assert loaded.points(features) == pytest.approx(model.points(features), abs=0.05)
    assert not list(path.parent.glob(".*"))  # no temporary file left behind


def test_load_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    """A missing file, garbage and another format are one-line ModelErrors."""
    with pytest.raises(ModelError, match="no such model file"):
        Model.load(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a policyd model"):
        Model.load(garbage)
    other = tmp_path / "other.model"
    with open(other, "wb") as file:
        np.savez_compressed(file, weights=np.zeros(4, dtype=np.float16),
                            meta=np.frombuffer(b'{"format": 99}', dtype=np.uint8))
    with pytest.raises(ModelError, match="format 99"):
        Model.load(other)


def test_training_needs_both_classes() -> None:
    """Training on one class only is refused with the counts."""
    with pytest.raises(ValueError, match="ham and spam"):
        classifier.train([(content.extract(raw), False) for raw, _ in corpus(each=2)], bits=12)


def test_hashing_is_stable_and_bounded() -> None:
    """Feature indices do not depend on the process (CRC-32, fixed multipliers) and fit the table."""
    token = (zlib.crc32(b"gratuit") * 0x9E3779B1 % (1 << 32)) >> (32 - 20)
    assert classifier.vectorize(content.Features(("gratuit",), ""), 20).tolist() == [token]
    indices = classifier.vectorize(content.extract(mail(SPAM_WORDS, "GAGNEZ", "promo.example.biz")), 10)
    assert len(indices) and indices.min() >= 0 and indices.max() < 1024
    assert classifier.vectorize(content.Features((), ""), 10).size == 0


def test_batches_give_each_message_its_own_features() -> None:
    """Hashed together (policyd score --json), each message gets exactly the indices it gets alone."""
    raws = [raw for raw, _ in corpus(seed=11, each=5)] + [
        b"",
        b"Subject: \xc3\xa9t\xc3\xa9\n\nl'argent \xc3\xa9t\xc3\xa9 facile, gagn\xc3\xa9 ! " + b"caf\xc3\xa9 " * 900,
        b"X-Odd: \xff\xfe\n\nab",
        b"Subject: x\n\n" + b"word " * 20_000,
        b"From: a@b.example\n\n",
    ]
    batch = [content.extract(raw) for raw in raws]
    for features, indices in zip(batch, classifier.batch_indices(batch), strict=True):
        alone = classifier.message_vector(features).all()
        assert np.array_equal(np.sort(indices), np.sort(alone))
    model = classifier.train(((content.extract(raw), spam) for raw, spam in corpus()), bits=16)
    assert model.points_many(batch) == pytest.approx([model.points(f) for f in batch])
    assert model.points_many([]) == []
    # More text than one buffer takes (3-byte characters) is hashed in smaller batches, alike.
    wide = [content.extract(f"Subject: {n}\n\n{'漢字 ' * 3000}".encode()) for n in range(20)]
    for features, indices in zip(wide, classifier.batch_indices(wide), strict=True):
        assert np.array_equal(np.sort(indices), np.sort(classifier.message_vector(features).all()))


def test_scoring_many_messages_is_scoring_each() -> None:
    """ContentScorer.score_many (policyd score --json) gives what score gives each message without reasons."""
    from policyd.content.scorer import ContentScorer

    model = classifier.train(((content.extract(raw), spam) for raw, spam in corpus()), bits=16)
    scorer = ContentScorer(model, None)
    raws = [raw for raw, _ in corpus(seed=12, each=4)] + [b"", b"Subject: x\n\nbody\n"]
    assert scorer.score_many(raws) == [scorer.score(raw, explain=0) for raw in raws]


def test_the_scorer_reads_the_header_secret_the_checks_write() -> None:
    """policyd score finds the header secret without importing the checks: the same file name."""
    from policyd.checks import network_header
    from policyd.content import scorer

    assert scorer.SECRET_NAME == network_header.SECRET_NAME


def test_empty_model_is_neutral() -> None:
    """A model that learned nothing gives 0 points."""
    assert Model.empty(bits=12).points(content.extract(b"Subject: x\n\nhello\n")) == 0.0


def test_shipped_model_loads_and_scores() -> None:
    """The default model shipped with policyd loads and tells obvious spam from a work mail."""
    from policyd.content.scorer import shipped_model

    shipped = Model.load(shipped_model())
    spam = content.extract(
        b"Subject: FREE!!! Claim your prize now\nContent-Type: text/html\n\n"
        b"<html><body><a href='http://click.example.biz/r'>CLICK HERE</a> to claim your FREE prize. "
        b"Limited time offer, act now! Unsubscribe</body></html>"
    )
    ham = content.extract(
        b"Subject: Re: patch for the build script\nIn-Reply-To: <123@example.org>\n\n"
        b"Thanks, I applied your patch to the build script and ran the tests again.\n"
        b"> Did you try with the latest version of the library?\n"
    )
    assert shipped.points(spam) > shipped.points(ham)


def test_assess_is_points_and_explain_in_one(model: Model) -> None:
    """assess gives the points and the reasons of points() and explain(); below explain_at, no reasons."""
    features = content.extract(mail(["gratuit", "casino", "cadeau", "meeting"] * 3, "GAGNEZ", "promo.example.biz"))
    points, reasons = model.assess(features, 5)
    assert points == pytest.approx(model.points(features))
    assert reasons == model.explain(features, 5)
    assert model.assess(features, 5, explain_at=points + 1) == (points, [])
    assert model.assess(features, 0) == (points, [])


def test_explain_counts_a_shared_index_once(model: Model) -> None:
    """Reasons add up to the content points (less the offset): each feature index counts once."""
    features = content.extract(mail(SPAM_WORDS + HAM_WORDS, "notes", "promo.example.biz"))
    reasons = model.explain(features, top=100_000)
    assert sum(r.points for r in reasons) == pytest.approx(model.points(features) - model.offset - model.scale * model.bias)
    assert reasons[-1].points == min((r.points for r in reasons), key=abs)


def test_numpy_words_are_the_words_of_plain_text() -> None:
    """Words found and hashed by numpy over the whole text are text_words, and a word hashes alike anywhere."""
    pick = random.Random(17)
    pieces = ["gagné", "l'offre", "qu'il", "e-mail", "v1.2", "été", "x", "ab", "\udcff", "  ", "\n", "!", "€",
              "a" * 41, "à", "naïve", "word", "mot"]
    for _ in range(500):
        text = content.plain_text("".join(pick.choice(pieces) for _ in range(pick.randint(0, 40))))
        found = classifier.Words.of(text)
        assert [found.word(n) for n in range(len(found.starts))] == content.text_words(text)
    twice = classifier.Words.of("offre gratuite, offre")
    assert twice.hashes[0] == twice.hashes[2] != twice.hashes[1]


def test_explain_names_header_fields_words_and_tokens() -> None:
    """Reasons are things a person can find in the message: header fields, words, tokens."""
    trained = classifier.train(((content.extract(raw), spam) for raw, spam in corpus()), bits=16)
    raw = b"X-Mailer: PromoBlaster 9\r\n" + mail(SPAM_WORDS * 2, "GAGNEZ", "promo.example.biz")
    names = [r.feature for r in trained.explain(content.extract(raw), top=100_000)]
    assert "header X-Mailer: PromoBlaster 9" in names
    assert "gagnant" in names and "url:promo.example.biz" in names
    # The text's 4-grams add up by phrase: runs of three words of the message's text, as they stand in it.
    features = content.extract(raw)
    phrases = [name.removeprefix('phrase "').removesuffix('"') for name in names if name.startswith("phrase ")]
    assert phrases and all(phrase in " ".join(features.text.split()) and len(phrase.split()) <= 3
                           for phrase in phrases)
    # Every other reason is one token or one word of the message (or its unaccented form).
    words = {form for word in content.text_words(features.text) for form in (word, content.unaccented(word))}
    assert all(name in words or name in features.tokens for name in names
               if not name.startswith(("header ", "phrase ")))


def test_a_model_of_an_older_format_gives_way_to_the_shipped_one(tmp_path: Path) -> None:
    """After an upgrade, a trained model of an older format is set aside for the shipped one, never a failure."""
    import json as json_module

    from policyd.content.scorer import load_model, shipped_model
    from tests.conftest import make_config

    path = tmp_path / "content.model"
    meta = {"format": classifier.FORMAT - 1, "bias": 0.0, "scale": 1.0, "offset": 0.0, "info": {}}
    with path.open("wb") as file:
        np.savez_compressed(
            file, weights=np.zeros(16, dtype=np.float16),
            meta=np.frombuffer(json_module.dumps(meta).encode(), dtype=np.uint8),
        )
    with pytest.raises(classifier.OldModel):
        Model.load(path)
    model, used = load_model(make_config(f"content:\n  model: {path}\n"))
    assert used == shipped_model()
    assert model.weights.size > 16
