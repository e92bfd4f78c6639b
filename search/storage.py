"""Optuna storages from a URL or a journal file path; passwords never shown."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna

from search.errors import StudyError

JOURNAL_SUFFIXES = (".journal", ".log", ".jsonl")


def mask(url: str) -> str:
    """The URL with any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def default_storage(study_name: str, runs_dir: Path = Path("runs"), create: bool = True) -> str:
    """sqlite:///runs/<name>.db, creating runs/ when needed (not with create=False: a dry run writes nothing)."""
    if create:
        runs_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs_dir / study_name}.db"


def is_journal(url: str) -> bool:
    """A plain file path (or journal:PATH) means Optuna's journal storage, e.g. on NFS."""
    return url.startswith("journal:") or ("://" not in url and url.endswith(JOURNAL_SUFFIXES))


def check_url(url: str) -> None:
    """Reject a malformed storage URL before anything is created."""
    if is_journal(url):
        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise StudyError(f"--storage {url}: folder {path.parent} does not exist")
        return
    match = re.match(r"^([a-z0-9+]+)://", url)
    if not match:
        raise StudyError(f"--storage {mask(url)}: not a storage URL (sqlite:///file.db, postgresql://..., "
                         "or a file path ending in .journal)")
    dialect = match.group(1).split("+")[0]
    if dialect not in {"sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql"}:
        raise StudyError(f"--storage {mask(url)}: unknown database {dialect!r} (use sqlite, postgresql or mysql)")
    if dialect == "sqlite":
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise StudyError(f"--storage {url}: folder {Path(path).parent} does not exist")


def quiet_optuna() -> None:
    """Optuna's per-trial log lines and experimental-feature warnings are noise on our progress bar."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage. Workers keep their own heartbeats (search.workers), the same on every storage."""
    check_url(url)
    quiet_optuna()
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except ModuleNotFoundError as exc:
            raise StudyError(f"--storage {mask(url)}: database driver {exc.name!r} is not installed") from None
        except Exception as exc:  # sqlalchemy raises many types; the user needs the first line only
            # Workers starting together race to create Optuna's tables; the losers just retry.
            if attempt < 2 and ("already exists" in str(exc) or "duplicate key" in str(exc)):
                time.sleep(1 + attempt)
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StudyError(f"--storage {mask(url)}: cannot open ({mask(first)[:200]})") from None
    raise AssertionError("unreachable")
