"""The package's one domain error type. The CLI prints it as one line; the server maps it to a 4xx."""


class McrExitError(Exception):
    """A bad input or an impossible request, with a message a user can act on."""


class ModelLoadError(McrExitError):
    """The model could not be found or loaded."""


class DataError(McrExitError):
    """The prompts or labels could not be read or are unusable."""


class ConfigError(McrExitError):
    """An option value is out of range or inconsistent."""


class MissingExtraError(McrExitError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed: pip install 'mcr-exit[{extra}]'")
