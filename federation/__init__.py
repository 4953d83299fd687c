"""fedprop's shared core: data contract, features, models, privacy accounting, ledger, crypto, metrics.

Imports nothing from ``clients``, ``server`` or ``simulations``. ``federation.privacy`` imports neither
torch nor flwr so that compliance code can be audited on its own.
"""
