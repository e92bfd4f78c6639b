"""Scoring with lm-eval tasks: task loading and subsets, the fast LM engine, metrics, item streams."""

from objectives.errors import TaskInputError
from objectives.suite import ItemScore, Suite, SuiteResult, SuiteRun
from objectives.tasks import TaskSpec

__all__ = ["ItemScore", "Suite", "SuiteResult", "SuiteRun", "TaskInputError", "TaskSpec"]
