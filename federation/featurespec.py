"""The feature layout of a dataset, known without looking at any partner's data.

The server builds the initial global model from this alone; every partner encodes its data to the same
columns. For the synthetic default it is the declared event features plus the fixed plan vocabulary.
"""
from __future__ import annotations

from federation.config import DataConfig
from federation.features import EVENT_FEATURES, CategoricalFeature

SYNTHETIC_PLANS = ("basic", "plus", "premium")
SYNTHETIC_CATEGORICAL: tuple[CategoricalFeature, ...] = (CategoricalFeature("plan", SYNTHETIC_PLANS),)


def feature_names(data: DataConfig) -> tuple[str, ...]:
    if data.kind == "synthetic":
        names = [f.name for f in EVENT_FEATURES]
        for c in SYNTHETIC_CATEGORICAL:
            names += c.columns
        return tuple(names)
    from federation.contract import contract_feature_names  # real data: the declared contract

    return tuple(contract_feature_names(data))
