"""The small error hierarchy every fedprop module raises from. All are ValueErrors.

Messages say what is wrong, where (key, column, file, row sample), why it matters and what to do.
"""
from __future__ import annotations

import re


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


# ---------------------------------------------------------------------------- what may leave a node
class Problem(str):
    """One validation problem: the full local message (a ``str``: file, column, row numbers, what to do) plus
    the public parts only -- a stable ``code``, the contract's ``column`` (or key) and a ``count``. Never a value."""

    code: str
    column: str
    count: int

    def __new__(cls, message: str, *, code: str, column: str = "", count: int = 0) -> "Problem":
        self = super().__new__(cls, message)
        self.code, self.column, self.count = code, column, int(count)
        return self

    def __reduce__(self):  # keeps code/column/count through pickling (Ray workers)
        return (_problem, (str(self), self.code, self.column, self.count))


def _problem(message: str, code: str, column: str, count: int) -> Problem:
    return Problem(message, code=code, column=column, count=count)


_KEY = re.compile(r"(?<![\w.-])([a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*)=")
_CODES = {
    "BudgetExceededError": "budget_exceeded",
    "LedgerIntegrityError": "ledger_integrity",
    "PrivacyError": "privacy_error",
    "ConfigError": "config_error",
}


def _public_name(text: str, limit: int = 64) -> str:
    """A column or key name as it may be sent: printable, no quotes, bounded."""
    return "".join(ch for ch in str(text) if ch.isprintable() and ch not in "'\"\\")[:limit]


def public_reason(exc: BaseException) -> str:
    """What a node may send about a failure (Flower puts ``str(exception)`` into the error reply).

    Only the error category, the problem codes and the contract's column names or config keys; never
    ``str(exc)``, which may quote a customer id or a cell, and no counts: "too_few_positives rows=3" would tell
    the coordinator a partner's exact number of positives, a raw count that is no DP release. Log ``exc`` in full
    locally instead.
    """
    if isinstance(exc, DataValidationError):
        parts = []
        for p in exc.problems[:20]:
            if isinstance(p, Problem):
                parts.append(p.code + (f" column={_public_name(p.column)}" if p.column else ""))
            else:
                parts.append("unclassified")
        more = f"; +{len(exc.problems) - 20} more" if len(exc.problems) > 20 else ""
        return f"data_validation_failed: {len(exc.problems)} problem(s): " + "; ".join(parts) + more
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODES and issubclass(cls, FedpropError):
            code = _CODES[cls.__name__]
            if code == "config_error":
                keys = sorted({_public_name(k) for k in _KEY.findall(str(exc))})[:10]
                return code + (f": keys {', '.join(keys)}" if keys else "")
            return code
    if isinstance(exc, FedpropError):
        return "fedprop_error: " + _public_name(type(exc).__name__)
    return "internal_error: " + _public_name(type(exc).__name__) + " (details in the node's local log)"
