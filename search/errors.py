"""Errors a user can cause in a study: bad study file, bad storage, unknown study."""


class StudyError(ValueError):
    """A study cannot run because of its input; the message says what to fix."""
