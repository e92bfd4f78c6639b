"""An input contract that counts the non-base inputs (mergekit's min_non_base / max_non_base)."""

from __future__ import annotations

from dataclasses import dataclass

from merge_core.methods.base import Contract


@dataclass(frozen=True)
class NonBaseContract(Contract):
    """Contract whose counts apply to the inputs that are not the base."""

    min_non_base: int = 0
    max_non_base: int | None = None

    def check(self, models: list[str], base: str | None) -> str | None:
        """What is wrong with these inputs, or None."""
        problem = super().check(models, base)
        if problem:
            return problem
        count = len([m for m in models if m != base]) if self.base != "ignored" else len(models)
        if count < self.min_non_base:
            noun = "model" if self.min_non_base == 1 else "models"
            return f"this method needs at least {self.min_non_base} {noun} besides the base, got {count}"
        if self.max_non_base is not None and count > self.max_non_base:
            exact = self.min_non_base == self.max_non_base
            what = f"exactly {self.min_non_base}" if exact else f"at most {self.max_non_base}"
            return f"this method takes {what} models besides the base, got {count}"
        return None
