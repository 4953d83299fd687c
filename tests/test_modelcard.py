"""Model cards: validated inputs, deterministic JSON, Markdown pinned in full, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from federation import metrics as M
from federation.errors import FedpropError
from federation.modelcard import (
    ModelCardError,
    PrivacyGuarantee,
    build_model_card,
    render_json,
    render_markdown,
    write_model_card,
)

CONTRACT = "ab" * 32
MODEL_SHA = "cd" * 32


def _card(**overrides):
    kwargs = dict(
        task="churn",
        model_kind="logistic_regression",
        feature_names=["tenure_days", "n_purchases_90d"],
        contract_hash=CONTRACT,
        rounds=5,
        num_partners=3,
        metrics={
            "n": 1200, "base_rate": 0.2, "auc_roc": 0.8123456, "auc_tie_bound": 0.0004, "pr_auc": 0.5,
            "log_loss": 0.41, "brier": 0.13, "ece": float("nan"), "top_decile_lift": 3.1,
            "score_resolution": 0.001,
            "gains": {"fraction": [0.5, 1.0], "cumulative_gains": [0.8, 1.0], "cumulative_lift": [1.6, 1.0]},
        },
        privacy=[
            PrivacyGuarantee(partner="partner-1", epsilon=2.0, delta=1e-5, accountant="rdp"),
            PrivacyGuarantee(partner="partner-0", epsilon=1.5, delta=1e-5, accountant="rdp"),
        ],
        model_file="global_model.pt",
        model_sha256=MODEL_SHA,
        created_at="2025-01-01T00:00:00Z",
    )
    kwargs.update(overrides)
    return build_model_card(**kwargs)


EXPECTED_MD = f"""# Model card: churn model

| | |
|---|---|
| Task | churn |
| Model | logistic_regression |
| Model file | global_model.pt (sha256 `{MODEL_SHA}`) |
| Data contract | `{CONTRACT}` |
| Features | 2 |
| Training rounds | 5 |
| Partners | 3 |
| Created | 2025-01-01T00:00:00Z |

## Metrics

| Metric | Value |
|---|---|
| AUC-ROC | 0.8123 |
| PR-AUC (average precision) | 0.5000 |
| Log loss | 0.4100 |
| Brier score | 0.1300 |
| Expected calibration error | n/a |
| Top-decile lift | 3.1000 |
| Base rate | 0.2000 |
| Held-out customers | 1,200 |

| Other metric | Value |
|---|---|
| auc_tie_bound | 0.0004 |
| score_resolution | 0.0010 |

Combined from partners' score histograms (bin width 0.001): log loss and Brier are exact, ECE is exact for its bins, and AUC-ROC is within 0.0004 of the AUC of the pooled predictions.

### Cumulative gains and lift

| Top share | Cumulative gains | Cumulative lift |
|---|---|---|
| 50% | 0.8000 | 1.6000 |
| 100% | 1.0000 | 1.0000 |

## Evaluation release

Evaluation histograms were released without noise (a non-private run): they reveal each partner's number of held-out customers, its base rate and its score distribution per class at bin resolution, and a sparsely populated bin can single out a customer's score and label.

## Privacy

| Partner | Epsilon | Delta | Accountant | Unit |
|---|---|---|---|---|
| partner-0 | 1.500 | 1.0e-05 | rdp | customer |
| partner-1 | 2.000 | 1.0e-05 | rdp | customer |

Each listed partner's customers are protected by (epsilon, delta)-differential privacy at the customer level over all training rounds and evaluation releases of this model, as computed by the named accountant from the privacy ledger's mechanism records (with secure aggregation the server sees no per-partner figure: the epsilon listed is the target each partner's node enforced).
1 partner(s) have no differential-privacy guarantee for this model.

## Features

- `tenure_days`
- `n_purchases_90d`
"""


def test_markdown_is_pinned_in_full():
    assert render_markdown(_card()) == EXPECTED_MD


def test_json_is_strict_deterministic_and_round_trips():
    card = _card()
    text = render_json(card)
    assert text == render_json(_card())

    def refuse(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    loaded = json.loads(text, parse_constant=refuse)
    assert loaded == card
    assert loaded["metrics"]["ece"] is None  # NaN becomes null
    assert loaded["schema"] == "fedprop-model-card" and loaded["schema_version"] == 1
    assert loaded["training"] == {"rounds": 5, "partners": 3}
    assert [g["partner"] for g in loaded["privacy"]["guarantees"]] == ["partner-0", "partner-1"]
    assert loaded["privacy"]["guarantees"][0] == {
        "partner": "partner-0", "epsilon": 1.5, "delta": 1e-5, "accountant": "rdp", "unit": "customer"}


def test_card_from_real_metrics_and_noisy_evaluation():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(int)
    p = np.clip(0.25 + 0.3 * y + 0.3 * rng.random(2000), 0, 1)
    from federation.privacy.discrete import sample_discrete_gaussian

    flat = M.release_histogram(y, p, edges=M.logit_edges(20), sigma=2.0, sampler=sample_discrete_gaussian, prefix="h.")
    hist = M.combine_releases([flat], prefix="h.").histogram()
    mech = {"kind": "discrete_gaussian", "release": "evaluation_histogram", "sigma": 2.0, "epsilon": 1.0, "delta": 1e-5,
            "unit": "customer", "ledger_event": {"kind": "discrete_gaussian", "noise_multiplier": 2.0, "count": 1}}
    card = _card(metrics=M.summarize(hist), evaluation_mechanism=mech, privacy=[], created_at=None)
    loaded = json.loads(render_json(card))
    assert loaded["metrics"]["reliability"]["count"] == M.summarize(hist)["reliability"]["count"]
    assert loaded["evaluation"]["noise"]["ledger_event"] == mech["ledger_event"]
    md = render_markdown(card)
    assert "**This model was trained without differential privacy.**" in md
    assert "discrete_gaussian noise" in md
    assert "| Created |" not in md and "| Top-decile lift |" in md


def test_write_is_atomic_and_matches_rendering(tmp_path):
    card = _card()
    out = tmp_path / "run" / "round-5"
    json_path, md_path = write_model_card(card, out)
    assert json_path.read_text() == render_json(card) and md_path.read_text() == render_markdown(card)
    json_path2, _ = write_model_card(_card(rounds=6), out)  # overwrite in place
    assert json.loads(json_path2.read_text())["training"]["rounds"] == 6
    assert sorted(p.name for p in out.iterdir()) == ["model_card.json", "model_card.md"]
    with pytest.raises(ModelCardError):
        write_model_card(card, out, stem="../escape")


def test_invalid_inputs_are_reported_together():
    with pytest.raises(ModelCardError) as err:
        _card(
            task="",
            feature_names=["a", "a"],
            contract_hash="not-a-hash",
            rounds=0,
            num_partners=1,
            privacy=[
                PrivacyGuarantee(partner="p0", epsilon=float("inf"), delta=1e-5, accountant="rdp"),
                PrivacyGuarantee(partner="p0", epsilon=1.0, delta=1.5, accountant="", unit="row"),
            ],
            metrics={"bad": object()},
            evaluation_mechanism={"kind": "laplace", "epsilon": float("nan")},
        )
    msg = str(err.value)
    assert isinstance(err.value, FedpropError)
    for needle in ("task", "duplicates", "contract_hash", "rounds", "epsilon", "delta", "accountant",
                   "unit", "more than once", "2 entries but the federation has 1", "metrics.bad",
                   "evaluation_mechanism.unit", "evaluation_mechanism.epsilon", "evaluation_mechanism.delta"):
        assert needle in msg, needle
    assert msg.startswith("14 problem(s)")


def test_a_card_from_dp_releases_says_its_values_are_noisy_where_they_are_read():
    """An onboarding trial read 'Held-out customers 1,291' and 'AUC 0.8397' as exact (true: 1,431 and 0.802); only a
    later table said the values were DP releases."""
    card = _card(metrics={"n": 1291, "base_rate": 0.2, "auc_roc": 0.8397, "dp_release": True,
                          "auc_roc_half_width": 0.049, "auc_roc_meaningful": True})
    md = render_markdown(card)
    assert "| Metric | DP estimate (from noisy counts) |" in md
    assert "| Held-out customers (noisy count) | 1,291 |" in md and "| AUC-ROC | 0.8397 +- 0.0490 |" in md
