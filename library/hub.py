"""Hugging Face Hub upload of saved models and states, and resume from a state on the Hub (sd-scripts' flags).

Uploads go through huggingface_hub's ``HfApi``; a failed upload is one warning line and training goes on. With
``--async_upload`` uploads run one at a time, in order, on a worker thread that ``HubPublisher.close`` waits for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from library.errors import UserError
from library.io import atomic_dir

logger = logging.getLogger("sdtrain")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
UPLOAD_REPO_TYPES = ("model", "dataset")
RESUME_FORMAT = "{repo_id}/{path_in_repo}[:{revision}[:{repo_type}]], e.g. me/my-lora/my-lora-state:main:model"


@dataclass(frozen=True)
class HubSettings:
    """The Hub flags, named as in sd-scripts; the token is kept out of ``repr`` so it never reaches a log."""

    huggingface_repo_id: str | None = None
    huggingface_repo_type: str | None = None
    huggingface_path_in_repo: str | None = None
    huggingface_token: str | None = dataclasses.field(default=None, repr=False)
    huggingface_repo_visibility: str | None = None
    save_state_to_huggingface: bool = False
    resume_from_huggingface: bool = False
    async_upload: bool = False

    @property
    def repo_type(self) -> str:
        """The repository type, ``model`` when not given."""
        return self.huggingface_repo_type or "model"

    @property
    def private(self) -> bool:
        """A created repository is private unless ``--huggingface_repo_visibility public`` (as in sd-scripts)."""
        return self.huggingface_repo_visibility != "public"

    def check(self, resume: str | None = None) -> None:
        """Raise a one-line UserError for a bad value or combination; ``resume`` is the ``--resume`` value."""
        repo_id = self.huggingface_repo_id
        if repo_id is not None and not _REPO_ID.match(repo_id):
            raise UserError(f"--huggingface_repo_id {repo_id!r}: write it as namespace/name, e.g. me/my-lora")
        if self.huggingface_repo_type is not None and self.huggingface_repo_type not in UPLOAD_REPO_TYPES:
            raise UserError(
                f"--huggingface_repo_type {self.huggingface_repo_type!r}: use 'model' (the default) or 'dataset'"
            )
        if self.huggingface_repo_visibility not in (None, "public", "private"):
            raise UserError(
                f"--huggingface_repo_visibility {self.huggingface_repo_visibility!r}: use 'public' or 'private'"
            )
        for flag in ("save_state_to_huggingface", "async_upload", "huggingface_path_in_repo"):
            if getattr(self, flag) not in (None, False) and repo_id is None:
                raise UserError(f"--{flag} needs --huggingface_repo_id (the repository to upload to)")
        if self.resume_from_huggingface:
            if not resume:
                raise UserError(f"--resume_from_huggingface needs --resume {RESUME_FORMAT}")
            parse_resume_spec(resume, self)


class HubPublisher:
    """Uploads each saved model file or folder (and state folders with --save_state_to_huggingface) to the Hub repo.

    Call ``publish`` after each save on the main process and ``close`` once at the end (also after an error).
    """

    def __init__(self, settings: HubSettings, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.settings = settings
        self._api = HfApi(endpoint=endpoint, token=settings.huggingface_token or None, library_name="sd-trainer")
        self._repo_ready = False
        self._published = 0
        self._finished = 0
        self.uploaded: list[str] = []
        self._jobs: queue.Queue[tuple[Path, Path, str] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        if settings.async_upload and settings.huggingface_repo_id:
            self._worker = threading.Thread(target=self._work, name="hub-upload", daemon=True)
            self._worker.start()

    def destination(self, path: Path) -> str:
        """Where ``path`` goes in the repo: ``--huggingface_path_in_repo``/name, or name at the repo root."""
        prefix = (self.settings.huggingface_path_in_repo or "").strip("/")
        return f"{prefix}/{path.name}" if prefix else path.name

    def publish(self, path: Path, *, state: bool) -> None:
        """Upload a saved model file/folder (when a repo is set) or a state folder (with save_state_to_huggingface)."""
        if not self.settings.huggingface_repo_id or (state and not self.settings.save_state_to_huggingface):
            return
        path = Path(path)
        self._published += 1
        if self._worker is None:
            self._upload(path, path, self.destination(path))
            return
        try:
            staged = _snapshot(path)
        except OSError as exc:
            logger.warning(f"Hub: could not queue {path} for upload to {self.settings.huggingface_repo_id}: {exc}")
            self._published -= 1
            return
        self._jobs.put((path, staged, self.destination(path)))

    def close(self) -> list[str]:
        """Wait for queued uploads, log a summary line and return the paths uploaded in the repo."""
        repo = self.settings.huggingface_repo_id
        if self._worker is not None:
            pending = self._published - self._finished
            if pending:
                logger.info(f"Hub: waiting for {pending} pending upload(s) to {repo}")
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        if self._published:
            failed = self._published - len(self.uploaded)
            logger.info(
                f"Hub: uploaded {len(self.uploaded)} of {self._published} to {self.settings.repo_type} repo {repo}"
                + (f" ({failed} failed, see the warnings above)" if failed else "")
            )
        return list(self.uploaded)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._upload(*job)
            shutil.rmtree(job[1].parent, ignore_errors=True)
            self._finished += 1

    def _upload(self, path: Path, local: Path, dest: str) -> None:
        """Upload ``local`` (``path`` itself or its snapshot) as ``dest``; a failure is one warning line."""
        settings = self.settings
        repo_id, repo_type = settings.huggingface_repo_id, settings.repo_type
        try:
            if not self._repo_ready:
                self._api.create_repo(repo_id, repo_type=repo_type, private=settings.private, exist_ok=True)
                self._repo_ready = True
            self._api.create_commit(
                repo_id, self._operations(local, dest), commit_message=f"Upload {dest}", repo_type=repo_type
            )
        except Exception as exc:  # noqa: BLE001 - any failure of an upload must leave training running (as sd-scripts)
            logger.warning(f"Hub: could not upload {path} to {repo_id} as {dest}: {_first_line(exc)}; training goes on")
            return
        self.uploaded.append(dest)
        logger.info(f"Hub: uploaded {path.name} to {repo_id}/{dest}")

    def _operations(self, path: Path, dest: str) -> list:
        """Add each file of ``path``; for a folder, also delete remote files under ``dest`` that it no longer has."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.errors import EntryNotFoundError

        if not path.is_dir():
            return [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(path))]
        files = sorted(p for p in path.rglob("*") if p.is_file())
        adds = [
            CommitOperationAdd(path_in_repo=f"{dest}/{p.relative_to(path).as_posix()}", path_or_fileobj=str(p))
            for p in files
        ]
        try:
            remote = self._api.list_repo_tree(
                self.settings.huggingface_repo_id, dest, recursive=True, repo_type=self.settings.repo_type
            )
            stale = {entry.path for entry in remote if hasattr(entry, "size")} - {op.path_in_repo for op in adds}
        except EntryNotFoundError:
            stale = set()
        return [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)] + adds


def _snapshot(path: Path) -> Path:
    """A hard-linked copy of ``path`` in a temporary folder beside it, so a queued upload sends what was saved now
    even if a later save replaces the file or a --save_last_n_* clean-up removes it (copies where links fail)."""
    staging = Path(tempfile.mkdtemp(prefix=".hub-upload-", dir=path.parent))
    try:
        if path.is_dir():
            shutil.copytree(path, staging / path.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, staging / path.name)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging / path.name


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (huggingface_hub's carry request ids on later lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class HubResumeSpec:
    """A parsed ``--resume`` value under --resume_from_huggingface."""

    repo_id: str
    path_in_repo: str
    revision: str
    repo_type: str

    @property
    def folder_name(self) -> str:
        """A local folder name for the downloaded state (its name in the repo, or the repo's name)."""
        return PurePosixPath(self.path_in_repo).name or self.repo_id.split("/")[1]


def parse_resume_spec(spec: str, settings: HubSettings) -> HubResumeSpec:
    """Parse ``{repo_id}/{path_in_repo}:{revision}:{repo_type}`` as sd-scripts does; the revision defaults to main,
    the type to --huggingface_repo_type (else model)."""
    where, *rest = spec.split(":")
    parts = where.strip("/").split("/")
    if len(rest) > 2 or len(parts) < 2 or not _REPO_ID.match("/".join(parts[:2])):
        raise UserError(f"--resume {spec!r} (with --resume_from_huggingface): write {RESUME_FORMAT}")
    revision = (rest[0] if rest else "") or "main"
    repo_type = (rest[1] if len(rest) > 1 else "") or settings.repo_type
    if repo_type not in ("model", "dataset", "space"):
        raise UserError(f"--resume {spec!r}: repo type {repo_type!r} is not model, dataset or space")
    return HubResumeSpec("/".join(parts[:2]), "/".join(parts[2:]), revision, repo_type)


def download_state(spec: str, settings: HubSettings, dest: Path, endpoint: str | None = None) -> Path:
    """Download the state folder that ``--resume`` names on the Hub into ``dest`` (replaced whole, atomically).

    Returns ``dest``. A bad spec, an unknown repo/revision/folder or an unreachable Hub is a one-line UserError.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where = parse_resume_spec(spec, settings)
    api = HfApi(endpoint=endpoint, token=settings.huggingface_token or None, library_name="sd-trainer")
    named = f"{where.repo_type} repo {where.repo_id} at {where.revision}"
    try:
        tree = api.list_repo_tree(
            where.repo_id,
            where.path_in_repo or None,
            recursive=True,
            revision=where.revision,
            repo_type=where.repo_type,
        )
        files = sorted(entry.path for entry in tree if hasattr(entry, "size"))
    except RepositoryNotFoundError:
        raise UserError(
            f"--resume {spec!r}: no {where.repo_type} repo {where.repo_id} (or no access: check the token)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"--resume {spec!r}: {where.repo_id} has no revision {where.revision!r}") from None
    except EntryNotFoundError:
        files = []
    except Exception as exc:  # noqa: BLE001 - HTTP, connection (httpx) and offline-mode errors: one line each
        raise UserError(f"--resume {spec!r}: cannot list {named}: {_first_line(exc)}") from exc
    if not files:
        raise UserError(f"--resume {spec!r}: no folder {where.path_in_repo!r} in {named}; write {RESUME_FORMAT}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{where.path_in_repo}/" if where.path_in_repo else ""
    logger.info(f"Hub: downloading {len(files)} file(s) of {where.path_in_repo or 'the repo'} from {named} to {dest}")
    with tempfile.TemporaryDirectory(prefix=".hub-download-", dir=dest.parent) as staging, atomic_dir(dest) as tmp:
        for name in files:
            try:
                got = hf_hub_download(
                    where.repo_id,
                    name,
                    repo_type=where.repo_type,
                    revision=where.revision,
                    local_dir=staging,
                    token=settings.huggingface_token or None,
                    endpoint=endpoint,
                )
            except Exception as exc:  # noqa: BLE001 - as above
                raise UserError(f"--resume {spec!r}: cannot download {name} from {named}: {_first_line(exc)}") from exc
            target = tmp / name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(got, target)
    return dest
