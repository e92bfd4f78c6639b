"""Errors a user can cause in a merge: bad config, missing or mismatched models."""


class MergeInputError(ValueError):
    """A merge cannot run because of its input; the message says what to fix."""
