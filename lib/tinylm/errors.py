"""Exceptions for bad input: each message names the file, key or value and says what to do."""


class TinyLMError(Exception):
    """Base class; workflow scripts print the message without a traceback."""


class ConfigError(TinyLMError, ValueError):
    """A configuration value is invalid (names the key and the value). `key` is the setting's place in the
    config where one setting is to blame, as its message writes it (`train.lr`, `models.condor.seeds[1]`):
    the workflow and check-config look it up to name the file and line that set it. Where the message
    lists several settings, `key` and `first` (its line of the message) are the first one's."""

    def __init__(self, message: str = "", key: str | None = None, first: str | None = None):
        super().__init__(message)
        self.key = key
        self.first = first


class DataError(TinyLMError, ValueError):
    """An input or intermediate file is missing, empty, malformed or inconsistent (names the file)."""


class CheckpointError(TinyLMError, ValueError):
    """A checkpoint does not match the model, the tokenizer or the run it is loaded into."""


class TrainingError(TinyLMError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class OutputError(TinyLMError, OSError):
    """An output could not be written for want of room (a full disk, a quota, a file-size limit); names
    the file. The file there before, if any, is kept (outputs are written atomically)."""
