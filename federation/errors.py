"""The small error hierarchy every fedprop module raises from. All are ValueErrors.

Messages say what is wrong, where (key, column, file, row sample), why it matters and what to do.
"""
from __future__ import annotations


class FedpropError(ValueError):
    """Root of fedprop's errors."""


class ConfigError(FedpropError):
    """A configuration value is invalid (names the full key and the allowed values)."""


class DataValidationError(FedpropError):
    """Input data breaks the data contract. Carries every problem found, not just the first."""

    def __init__(self, problems: list[str], *, source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in {source}" if source else f"{len(self.problems)} problem(s)"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class PrivacyError(FedpropError):
    """A privacy parameter or event is invalid or cannot be accounted."""


class BudgetExceededError(PrivacyError):
    """A release would exceed a privacy budget; states the numbers."""


class LedgerIntegrityError(PrivacyError):
    """A ledger failed verification; names the first bad entry."""
