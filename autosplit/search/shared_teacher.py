"""One teacher for every host of a study.

Hosts that share a study (one ``--storage postgresql://…``) must distil from one teacher, or the
study mixes students of different teachers. The first host to *claim* the teacher trains it (or
loads it from its own cache); the claim is a row of the study's user attributes that only one
insert can create, as the storage's unique (study, key) constraint refuses the others. The
owner then publishes the checkpoint where every host reads it (``--teacher-dir``, else the
MLflow artifact store of its search's parent run) and records the file's SHA-256 and place in
the study. The other hosts wait for that record, copy the file into their own teacher cache and
check its hash. A host whose data, or whose own cached teacher, differs from the study's is
refused in one line before any work.

The hash is of the checkpoint file, the figure export reports as the teacher's checksum.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from autosplit.checkpoint import sha256_file
from autosplit.errors import UserError
from autosplit.search import study as studies
from autosplit.search.attrs import StudyAttrs

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
CLAIM_KEY = StudyAttrs.key("teacher_claim")


def is_shared_storage(url: str) -> bool:
    """A storage other machines can reach (a database server), not a local file."""
    return not (url.startswith("sqlite") or url.startswith("journal:") or url.endswith(".log"))


def claim(storage: optuna.storages.BaseStorage, study_id: int, me: str) -> str:
    """Claim the study's teacher for ``me`` (a ``worker_id``); return its owner.

    On an RDB storage the claim is an INSERT of the attribute row: of hosts inserting at once,
    the unique (study_id, key) constraint lets exactly one commit (Optuna's own
    ``set_study_user_attr`` would overwrite instead). A claim left by a dead process of this
    host is taken over with a compare-and-set UPDATE, which also only one process wins. A
    journal file is one machine's: its workers share one teacher cache anyway."""
    from optuna.storages import RDBStorage

    if not isinstance(storage, RDBStorage):
        if CLAIM_KEY not in storage.get_study_user_attrs(study_id):
            storage.set_study_user_attr(study_id, CLAIM_KEY, me)
        return storage.get_study_user_attrs(study_id)[CLAIM_KEY]
    import sqlalchemy as sa

    table = sa.Table("study_user_attributes", sa.MetaData(), autoload_with=storage.engine)
    try:
        with storage.engine.begin() as conn:
            conn.execute(
                table.insert().values(study_id=study_id, key=CLAIM_KEY, value_json=json.dumps(me))
            )
        return me
    except sa.exc.IntegrityError:
        pass  # claimed already
    owner = storage.get_study_user_attrs(study_id)[CLAIM_KEY]
    if owner != me and studies.dead_here(owner):
        with storage.engine.begin() as conn:
            taken = conn.execute(
                table.update()
                .where(table.c.study_id == study_id)
                .where(table.c.key == CLAIM_KEY)
                .where(table.c.value_json == json.dumps(owner))
                .values(value_json=json.dumps(me))
            ).rowcount
        if taken == 1:
            log.warning("took over the teacher claim of %s, a dead process of this host", owner)
            return me
        owner = storage.get_study_user_attrs(study_id)[CLAIM_KEY]
    return owner


class StudyTeacher:
    """The study's teacher for this host: ``check`` before any work, ``obtain`` in place of
    training one (it creates the study, through ``open_study``, if no host has), ``publish``
    once the search's parent run exists."""

    def __init__(
        self,
        study_name: str,
        storage: optuna.storages.BaseStorage,
        open_study: Callable[[], optuna.Study],
        *,
        runs_dir: Path,
        shared: bool,
        teacher_dir: Path | None = None,
        wait_seconds: float = 7200.0,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.study_name, self.storage, self._open_study = study_name, storage, open_study
        self.study: optuna.Study | None = None
        self.runs_dir, self.shared, self.teacher_dir = Path(runs_dir), shared, teacher_dir
        self.wait_seconds, self.say, self.clock = wait_seconds, say, clock
        self.owned = False  # this process claimed the teacher: it publishes it

    def _study_id(self) -> int | None:
        try:
            return self.storage.get_study_id_from_name(self.study_name)
        except KeyError:
            return None  # no host has made the study yet

    @property
    def info(self) -> StudyAttrs:
        study_id = self._study_id()
        if study_id is None:
            return StudyAttrs()
        return StudyAttrs.read(self.storage.get_study_user_attrs(study_id))

    def _cached(self, key: str) -> Path:
        return self.runs_dir / "teachers" / key / "teacher.pt"

    def check(self, data_fingerprint: str, own_key: str) -> None:
        """Refuse this host, in one line, when its data or its cached teacher is not the
        study's."""
        info, name = self.info, self.study_name
        if info.data_fingerprint is not None and info.data_fingerprint != data_fingerprint:
            raise UserError(
                f"--study-name {name}: this host's data (fingerprint {data_fingerprint}) is not "
                f"the study's ({info.data_fingerprint}); give every host the same data files "
                "and space"
            )
        if info.teacher_sha256 is None:
            return
        for key in dict.fromkeys(k for k in (info.teacher_key, own_key) if k):
            path = self._cached(key)
            if path.is_file() and (sha := sha256_file(path)) != info.teacher_sha256:
                raise UserError(
                    f"--study-name {name}: this host's teacher {path} (SHA-256 {sha[:12]}) is not "
                    f"the study's ({info.teacher_sha256[:12]}); remove it to use the study's, "
                    "or use another --study-name"
                )

    def obtain(
        self,
        train: Callable[[], Any],
        load: Callable[[Path], Any],
        *,
        data_fingerprint: str,
        own_key: str,
    ) -> Any:
        """The study's teacher: ``load(path)`` of the published one, or, for the host that
        claims it, ``train()`` (which loads this host's cache when it has one)."""
        me = studies.worker_id()
        self.study = self._open_study()
        study_id = self.storage.get_study_id_from_name(self.study_name)
        waited_since, announced = self.clock(), False
        while True:
            info = self.info
            if info.teacher_sha256 is not None:
                # Published meanwhile, perhaps: this host's own cache must not contradict it.
                self.check(data_fingerprint, own_key)
                return load(local_copy(info, self.study_name, self.runs_dir, say=self.say))
            owner = claim(self.storage, study_id, me)
            if owner == me:
                self.owned = True
                return train()
            if self.clock() - waited_since > self.wait_seconds:
                raise UserError(
                    f"--study-name {self.study_name}: waited {self.wait_seconds:.0f}s for the "
                    f"teacher that {owner} claimed, and it is not published; check that host, "
                    "then run again (or raise --teacher-wait)"
                )
            if not announced:
                self.say(f"teacher: waiting for the study's, which {owner} is training")
                announced = True
            time.sleep(POLL_SECONDS)

    def publish(self, teacher: Any, publish_file: Callable[..., str | None]) -> None:
        """For the owner: put the teacher where every host reads it, then record its hash and
        place in the study (the others wait for this record). ``publish_file``: the tracker's,
        logs a file to the search's parent run and returns its URI (None: tracking is off)."""
        if not self.owned or self.study is None:
            return
        path = Path(teacher.path)
        sha = sha256_file(path)
        uri = None
        if self.teacher_dir is not None:
            folder = Path(self.teacher_dir)
            published = folder / f"{teacher.key}-{sha[:16]}.pt"
            if not published.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, published.with_suffix(".copying"))
                published.with_suffix(".copying").replace(published)
            uri = str(published.resolve())
        elif self.shared:
            uri = publish_file(path, folder="teacher")
        StudyAttrs(teacher_sha256=sha, teacher_uri=uri).write(self.study)
        if uri is not None:
            self.say(f"teacher: published for the study's hosts at {uri} (SHA-256 {sha[:12]})")


def local_copy(
    info: StudyAttrs, study_name: str, runs_dir: Path, *, say: Callable[[str], None] = print
) -> Path:
    """This host's copy of the study's teacher (its cache, or the checkpoint the package ships),
    fetched from where the study says it was published when this host has none; its hash
    checked. Export uses it too, so it evaluates with the study's teacher on any host."""
    target = Path(runs_dir) / "teachers" / str(info.teacher_key) / "teacher.pt"
    sha_wanted = str(info.teacher_sha256)
    if target.is_file() and sha256_file(target) == sha_wanted:
        return target
    from autosplit.teacher import shipped_teacher

    shipped = shipped_teacher(str(info.teacher_key))  # loaded from the package: never copied
    if shipped is not None and sha256_file(shipped) == sha_wanted:
        return shipped
    uri = info.teacher_uri
    if uri is None:
        raise UserError(
            f"--study-name {study_name}: its teacher (SHA-256 {sha_wanted[:12]}, from "
            f"{info.teacher_claim}) was not published (that search had no MLflow tracking and "
            f"no --teacher-dir); copy its teacher.pt to {target}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fetched = fetch_file(uri, Path(tmp), tracking_uri=info.tracking_uri)
        sha = sha256_file(fetched)
        if sha != sha_wanted:
            raise UserError(
                f"--study-name {study_name}: the teacher fetched from {uri} has SHA-256 "
                f"{sha[:12]}, not the study's {sha_wanted[:12]}; the published file was "
                "changed: re-run the search on a new --study-name"
            )
        fetched.replace(target)  # same folder: readers see all of it or none
    say(f"teacher: the study's (SHA-256 {sha[:12]}), fetched from {uri}")
    return target


def fetch_file(uri: str, folder: Path, *, tracking_uri: str | None) -> Path:
    """Download a published file (``runs:/…`` or another MLflow artifact URI, or a path on a
    shared file system) into ``folder``; its local path."""
    if "://" in uri or uri.startswith("runs:/"):
        import mlflow.artifacts

        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(folder), tracking_uri=tracking_uri
            )
        )
    if not Path(uri).is_file():
        raise UserError(f"{uri}: the published file is not there; is the shared folder mounted?")
    fetched = folder / Path(uri).name
    shutil.copyfile(uri, fetched)
    return fetched
