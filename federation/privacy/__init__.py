"""fedprop's privacy core: mechanism records, accountants, the signed ledger, budget policy, reports.

Pure Python (numpy, scipy, dp-accounting, cryptography, PyYAML, matplotlib for report plots only).
Imports neither torch, flwr nor opacus, so compliance can audit it on its own.
"""
from federation.privacy.accountants import (
    Accountant,
    available_accountants,
    calibrate_noise_multiplier,
    get_accountant,
    register_accountant,
)
from federation.privacy.events import EVENT_KINDS, Gaussian, Laplace, PoissonSampledGaussian, event_from_dict
from federation.privacy.ledger import (
    ENTRY_KINDS,
    SCHEMA_VERSION,
    Ledger,
    LedgerEntry,
    LedgerVerificationError,
    VerificationResult,
    generate_node_key,
    hash_bytes,
    load_public_key,
    load_signing_key,
    verify,
)
from federation.privacy.report import build_report, render_html, render_json, render_markdown, write_report
from federation.privacy.policy import (
    BudgetCheck,
    BudgetPolicy,
    Period,
    PolicyError,
    PolicyViolationError,
    check_round,
    check_run,
    load_policy,
    policy_from_mapping,
)

__all__ = [
    "Accountant",
    "available_accountants",
    "calibrate_noise_multiplier",
    "get_accountant",
    "register_accountant",
    "EVENT_KINDS",
    "Gaussian",
    "Laplace",
    "PoissonSampledGaussian",
    "event_from_dict",
    "ENTRY_KINDS",
    "SCHEMA_VERSION",
    "Ledger",
    "LedgerEntry",
    "LedgerVerificationError",
    "VerificationResult",
    "generate_node_key",
    "hash_bytes",
    "load_public_key",
    "load_signing_key",
    "verify",
    "BudgetCheck",
    "BudgetPolicy",
    "Period",
    "PolicyError",
    "PolicyViolationError",
    "check_round",
    "check_run",
    "load_policy",
    "policy_from_mapping",
    "build_report",
    "render_html",
    "render_json",
    "render_markdown",
    "write_report",
]
