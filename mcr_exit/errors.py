"""The package's one domain error type. The CLI prints it as one line; the server maps it to a 4xx."""

import errno


class McrExitError(Exception):
    """A bad input or an impossible request, with a message a user can act on."""


class ModelLoadError(McrExitError):
    """The model could not be found or loaded."""


class DataError(McrExitError):
    """The prompts or labels could not be read or are unusable."""


class ConfigError(McrExitError):
    """An option value is out of range or inconsistent."""


class OutputError(McrExitError):
    """The machine refused a write: a full disk, a quota, a read-only or forbidden folder."""


class MissingExtraError(McrExitError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed: pip install 'mcr-exit[{extra}]'")


# The errno values of an OSError that say the machine refused a write (not a bug in the writer).
REFUSED_WRITE_ERRNOS = frozenset(getattr(errno, name) for name in
                                 ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO", "EFBIG")
                                 if hasattr(errno, name))


def refused_write(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in REFUSED_WRITE_ERRNOS


def _environment(exc: BaseException | None) -> tuple[str, bool] | None:
    """(what failed, whether it was a database) when the machine failed rather than the code, else None.
    The causes are followed a few links: MLflow raises its own exception from the database's."""
    for _ in range(4):
        if exc is None:
            return None
        if refused_write(exc):
            return (f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)), False
        kind = type(exc)
        if kind.__name__ == "OperationalError" and kind.__module__.startswith("sqlalchemy"):
            return (str(exc).strip().splitlines()[0] if str(exc).strip() else kind.__name__), True
        exc = exc.__cause__ or exc.__context__
    return None


def environment_detail(exc: BaseException) -> str | None:
    """What failed, in one line, when the machine failed rather than the code, else None: a write the
    machine refused (a full disk, a read-only folder), or a database failing under MLflow's store
    (SQLAlchemy's ``OperationalError``: a full disk, a locked or unreadable file)."""
    found = _environment(exc)
    return None if found is None else found[0]


def environment_failure(exc: BaseException) -> str | None:
    """``environment_detail`` as a line for the user (a database failure says it is MLflow's), else None."""
    found = _environment(exc)
    if found is None:
        return None
    detail, database = found
    return f"the MLflow store's database failed: {detail}" if database else detail
