"""The score of a message: network points from the trusted header plus the classifier's content points.

:class:`ContentScorer` gives a message's :class:`Score`: network points
from the ``X-Policyd-Network`` header that Postfix added (only a copy whose
token verifies with the install's secret, made for this client, and above
the first ``Received`` header) plus content points from the classifier
(:mod:`policyd.content.classifier`).

The model is read from :func:`model_path` (``content.model``, else
``content.model`` beside the SQLite store, else
``/var/lib/policyd/content.model``), or, before any ``policyd train``, the
model shipped with policyd.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Sequence
from pathlib import Path

import attrs

from policyd.config import Config
from policyd.content import features as content
from policyd.content.classifier import Model, ModelError, OldModel, Reason
from policyd.errors import PolicydError

log = logging.getLogger("policyd.milter")


#: File name of a trained model beside the SQLite store (or in /var/lib/policyd).
MODEL_NAME = "content.model"


#: Reasons worked out for a spam score (kept with held mail, see :meth:`Score.summary`).
SUMMARY_REASONS = 8


def model_path(config: Config) -> Path:
    """Where ``policyd train`` writes the model and the milter and ``policyd score`` read it."""
    from policyd.statefiles import state_file

    return state_file(config, MODEL_NAME, config.content.model)


def shipped_model() -> Path:
    """The model that comes with policyd (trained on the SpamAssassin public corpus)."""
    return Path(str(importlib.resources.files("policyd") / "models" / "default.model"))


def load_model(config: Config) -> tuple[Model, Path]:
    """The trained model, else the shipped one; and the file it came from.

    A model trained by an earlier policyd (an older format) is set aside with
    a warning and the shipped one used, so an upgrade never stops the milter;
    ``policyd train`` makes a new one.

    :raises PolicydError: when the file exists but cannot be used.
    """
    path = model_path(config)
    if not path.exists():
        path = shipped_model()
    try:
        return Model.load(path), path
    except OldModel as error:
        log.warning("content model: %s; using the shipped model until policyd train makes a new one", error)
        return Model.load(shipped_model()), shipped_model()
    except ModelError as error:
        raise PolicydError(f"content model: {error}") from None


#: The header secret's file name: :data:`policyd.checks.network_header.SECRET_NAME`, named
#: here too so that ``policyd score`` without a secret starts without the checks' modules.
SECRET_NAME = "header.secret"  # noqa: S105 (a file name, not a secret)


def header_secret(config: Config, create: bool) -> bytes | None:
    """The install's header secret (:mod:`policyd.checks.reputation`), or None when unusable.

    :param create: create it when missing (the milter does; ``policyd score`` only reads).
    """
    from policyd.statefiles import load_secret, secret_file

    path = secret_file(config, SECRET_NAME, config.inbound.header_secret)
    if path is None:
        return None
    if not create and not path.exists():
        return None
    try:
        return load_secret(path, "header secret")
    except (OSError, ValueError) as problem:
        log.error("header secret %s unusable (%s): network points and releases are not trusted", path, problem)
        return None


@attrs.frozen
class Score:
    """A message's score and why.

    :ivar points: network + content points, compared with ``content.tag_at``.
    :ivar content: the classifier's points.
    :ivar network: points of the trusted ``X-Policyd-Network`` header (0 without one).
    :ivar network_reasons: that header's reasons (empty without one).
    :ivar reasons: the features that weigh most, strongest first.
    :ivar subject: the decoded Subject.
    """

    points: float
    content: float
    network: float = 0.0
    network_reasons: str = ""
    reasons: tuple[Reason, ...] = ()
    subject: str = ""

    def summary(self, top: int = 5) -> tuple[str, ...]:
        """Short reasons for headers and the quarantine list."""
        found = [f"network:{self.network_reasons}"] if self.network else []
        found += [r.feature for r in self.reasons if r.points > 0][:top]
        return tuple(found)


class ContentScorer:
    """Scores messages: network points of the trusted header + content points.

    :param model: the classifier.
    :param secret: the header secret; None: no header is trusted.
    :param max_bytes: bytes of a message scored (``content.max_body``).
    """

    def __init__(self, model: Model, secret: bytes | None, max_bytes: int = 1024 * 1024) -> None:
        self.model = model
        self.secret = secret
        self.max_bytes = max_bytes

    def network_points(
        self, headers: Sequence[tuple[str, str]], client: str | None = None
    ) -> tuple[float, str]:
        """Points and reasons of the first genuine ``X-Policyd-Network`` header above any ``Received``.

        Postfix puts the header it was told to PREPEND on top of the message;
        a copy the sender wrote comes below Postfix's own ``Received``
        header and, lacking the secret, never verifies anyway.
        """
        if self.secret is None:
            return 0.0, ""
        from policyd.checks.network_header import HEADER, parse_header, verify_header

        for name, value in headers:
            lower = name.lower()
            if lower == "received":
                break
            if lower != HEADER.lower():
                continue
            points = verify_header(value, self.secret, client=client or None)
            if points is not None:
                return points, parse_header(value).get("reasons", "")
        return 0.0, ""

    def score(
        self,
        raw: bytes,
        client: str | None = None,
        headers: Sequence[tuple[str, str]] | None = None,
        explain: int = 8,
        explain_at: float | None = None,
    ) -> Score:
        """The score of a message as bytes (its first ``max_bytes``).

        Working out the reasons costs as much as the score itself: a caller
        that shows only scores asks for none (``explain=0``), or only for
        the mail it calls spam (``explain_at``).

        :param client: the SMTP client address, which a trusted header must name.
        :param headers: the headers as the MTA gave them (else those of ``raw``).
        :param explain: how many reasons to give (0: none).
        :param explain_at: give reasons only to a score this high (None: always).
        """
        found, body = content.split_message(raw[: self.max_bytes])
        return self.score_message(found if headers is None else headers, body, client, explain, explain_at)

    def score_many(self, raws: Sequence[bytes]) -> list[Score]:
        """The scores of several messages as bytes, without reasons (:meth:`score` with ``explain=0`` of each).

        Their features are hashed by numpy together
        (:meth:`~policyd.content.classifier.Model.points_many`), much faster
        than one by one for a command that scores many files.
        """
        found = [content.split_message(raw[: self.max_bytes]) for raw in raws]
        features = [content.message_features(headers, body) for headers, body in found]
        scores = []
        for (headers, _), message, points in zip(found, features, self.model.points_many(features), strict=True):
            network, network_reasons = self.network_points(headers)
            scores.append(Score(round(points + network, 3), round(points, 3), network, network_reasons, (),
                                message.subject))
        return scores

    def score_message(
        self,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        client: str | None = None,
        explain: int = 8,
        explain_at: float | None = None,
    ) -> Score:
        """The score of a message as the milter has it: header fields, then the body (its first ``max_bytes``).

        :param client: the SMTP client address, which a trusted header must name.
        :param explain: how many reasons to give.
        :param explain_at: give reasons only to a score this high (None: always);
            the milter only needs them for the mail it may quarantine.
        """
        features = content.message_features(headers, body[: self.max_bytes])
        network, network_reasons = self.network_points(headers, client)
        threshold = None if explain_at is None else explain_at - network
        points, reasons = self.model.assess(features, explain, threshold)
        return Score(
            round(points + network, 3), round(points, 3), network, network_reasons, tuple(reasons), features.subject
        )
