"""Errors a user can cause in scoring: unknown task, bad task folder, bad model folder."""


class TaskInputError(ValueError):
    """Scoring cannot run because of its input; the message says what to fix."""


class NonFiniteOutput(RuntimeError):
    """The model's logits hold NaN or Inf: the model (e.g. a merge candidate) is broken, not the input."""
