"""Errors a user can cause in a merge: bad config, missing or mismatched models."""


class MergeInputError(ValueError):
    """A merge cannot run because of its input; the message says what to fix."""


class DegeneratePoint(MergeInputError):
    """Values that are valid apart from this one point, where the merge would be NaN (weights that
    sum to 0): `search merge` and a trial refuse it; a study's range check does not refuse a range for it."""
