"""The errors that mean "your input cannot be used", as opposed to a bug.

The CLIs report these as one line naming the key or file, without a traceback; anything else keeps
its traceback. Each module raises the one that fits and re-exports it where users look for it
(``tasks.params.ParamsError``, ``tasks.contracts.ContractError``, ``tasks.ingest.DatasetError``).
"""


class UserInputError(ValueError):
    """Base: params, data or files that the pipeline cannot use."""


class ParamsError(UserInputError):
    """params.yaml (or an override) is invalid; the message names every offending key."""


class ContractError(UserInputError):
    """A file does not match its data contract (missing column, wrong type, bad metadata)."""


class DatasetError(UserInputError):
    """The data cannot be used for metric learning (too few classes or images)."""
