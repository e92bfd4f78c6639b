"""Errors a user can cause in scoring: unknown task, bad task folder, bad model folder."""


class TaskInputError(ValueError):
    """Scoring cannot run because of its input; the message says what to fix."""
