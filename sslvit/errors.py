"""Errors that describe a user's mistake.

The command-line entry points catch :class:`UserError`, print its message as one line and exit with
code 2, so a typo in a recipe or a wrong path never ends in a traceback from deep inside torch.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the thing and how to fix it."""


class RecipeError(UserError):
    """A recipe field is unknown, has the wrong type, or holds an impossible value."""


class DataError(UserError):
    """A data source cannot be found, opened or used as asked."""


class CheckpointError(UserError):
    """A checkpoint or encoder export cannot be found, read or loaded into the model."""


class TrainingDiverged(UserError):
    """Too many optimisation steps in a row had a non-finite loss or gradient."""
