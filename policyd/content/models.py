"""The model in use and the previous ones kept beside it: swap in, list, roll back.

The model in use is the file :func:`~policyd.content.scorer.model_path`
names (``content.model`` beside the SQLite store by default), or, before
any ``policyd train`` or ``learn``, the shipped one.  Putting a new model in
use (:meth:`ModelFiles.swap`) keeps the one it replaces in the folder
``<model>.kept`` beside it (the shipped one too, so a rollback can go back
to it), and at most :data:`KEEP` of them; :meth:`ModelFiles.rollback` puts
the newest kept model back in use and forgets the one it replaces.

The new file replaces the old one by a rename, so ``policyd score`` and a
running milter (which looks at the file every few seconds) read the whole
old model or the whole new one.  Two commands changing the model at once
(two Dovecot ``pipe`` reports, say) take turns: each holds a lock on
``<model>.lock`` from reading the model in use to writing the new one, so
neither loses what the other learned.  Every file here is private (0600,
the folder 0700).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from policyd.content.classifier import Model, ModelError, OldModel
from policyd.errors import PolicydError
from policyd.statefiles import private_directory, private_file

log = logging.getLogger("policyd.content")

#: Previous models kept: enough to go back over a bad week of reports, a few MB each.
KEEP = 5

#: How a model was made, as ``policyd model list`` says it.
MADE = ("train", "learn", "rollback", "shipped")


class Refused(PolicydError):
    """A new model that the checks turned down: understood, and not done (exit status 1)."""

    exit_code = 1


@attrs.frozen
class KeptModel:
    """A model file and what its header says of it.

    :ivar path: the file.
    :ivar made: how it was made (:data:`MADE`).
    :ivar at: when (POSIX seconds).
    :ivar ham: ham messages of the training or learning that made it.
    :ivar spam: spam messages of it.
    :ivar in_use: whether it is the model in use.
    """

    path: Path
    made: str
    at: float
    ham: int
    spam: int
    in_use: bool

    @classmethod
    def of(cls, path: Path, model: Model, in_use: bool) -> KeptModel:
        """What ``model``'s header says, for the file ``path``."""
        info = model.info
        made = str(info.get("made") or ("shipped" if "corpus" in info else "train"))
        at = float(info.get("made_at") or info.get("trained_at") or 0)
        return cls(path, made, at, int(info.get("ham", 0)), int(info.get("spam", 0)), in_use)

    def as_dict(self) -> dict[str, object]:
        """For ``--json``."""
        return {"path": str(self.path), "made": self.made, "at": int(self.at), "ham": self.ham,
                "spam": self.spam, "in_use": self.in_use}


class ModelFiles:
    """The model in use at ``path`` (the shipped one while it does not exist) and the ones kept beside it.

    :param path: the model file (``content.model`` of the configuration).
    :param shipped: the model that comes with policyd.
    """

    def __init__(self, path: Path, shipped: Path) -> None:
        self.path = path
        self.shipped = shipped
        self.kept_dir = path.with_name(path.name + ".kept")
        self.lock_path = path.with_name(path.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock that makes changes to the model take turns."""
        try:
            private_directory(self.path.parent)
            private_file(self.lock_path)
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise PolicydError(f"cannot lock {self.lock_path}: {error.strerror or error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def current(self) -> tuple[Model, Path]:
        """The model in use and its file (the shipped model's while there is no trained one).

        A model of an older format gives way to the shipped one, as for the milter.

        :raises PolicydError: when the model file exists but cannot be read.
        """
        path = self.path if self.path.exists() else self.shipped
        try:
            return Model.load(path), path
        except OldModel as error:
            log.warning("content model: %s; learning onto the shipped model", error)
            return Model.load(self.shipped), self.shipped
        except ModelError as error:
            raise PolicydError(f"content model: {error}") from None

    def kept(self) -> list[KeptModel]:
        """The kept models, newest first (files that are not models are left out)."""
        found = []
        for path in self._kept_files():
            try:
                found.append(KeptModel.of(path, Model.load(path), in_use=False))
            except ModelError as error:
                log.warning("kept model %s left out: %s", path, error)
        return found

    def listing(self) -> list[KeptModel]:
        """The model in use, then the kept ones, newest first."""
        model, path = self.current()
        return [KeptModel.of(path, model, in_use=True), *self.kept()]

    def _kept_files(self) -> list[Path]:
        if not self.kept_dir.is_dir():
            return []
        return sorted((p for p in self.kept_dir.iterdir() if p.suffix == ".model" and not p.name.startswith(".")),
                      key=lambda p: p.name, reverse=True)

    def swap(self, model: Model, made: str) -> Path:
        """Put ``model`` in use, keeping the one it replaces (call with :meth:`locked` held).

        :returns: the file where the replaced model is kept.
        :raises PolicydError: when a file cannot be written.
        """
        now = time.time()
        model.info.update(made=made, made_at=int(now))
        try:
            private_directory(self.kept_dir)
            old, old_path = self.current()
            kept = self.kept_dir / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{time.time_ns() % 10**9:09d}.model"
            if old_path == self.path:
                os.link(self.path, kept)  # the old file itself: no copy, and it stays whole
            else:
                old.info.setdefault("made", "shipped")
                old.save(kept)
            model.save(self.path)
        except OSError as error:
            raise PolicydError(f"cannot write the model {self.path}: {error.strerror or error}") from None
        for extra in self._kept_files()[KEEP:]:
            extra.unlink(missing_ok=True)
        return kept

    def rollback(self) -> KeptModel:
        """Put the newest kept model back in use and forget the one in use (call with :meth:`locked` held).

        :returns: the model now in use, as it was kept (how and when it was first made).
        :raises Refused: when no model is kept.
        """
        for path in self._kept_files():
            try:
                model = Model.load(path)
            except ModelError as error:
                log.warning("kept model %s passed over: %s", path, error)
                continue
            before = KeptModel.of(path, model, in_use=True)
            model.info.update(made="rollback", made_at=int(time.time()), restored=before.as_dict())
            try:
                model.save(self.path)
            except OSError as error:
                raise PolicydError(f"cannot write the model {self.path}: {error.strerror or error}") from None
            path.unlink(missing_ok=True)
            return attrs.evolve(before, path=self.path)
        raise Refused(f"no previous model kept in {self.kept_dir}")
