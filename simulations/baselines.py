"""Baselines on exactly the federation's splits, all NON-PRIVATE references (no DP: they are never released):

* centralized: one model per task head on everyone's pooled training customers, the best of a tuned logistic
  regression (C grid) and HistGradientBoosting, chosen on a validation split of the pooled TRAINING data
  (``clients.personalize.fit_reference``); what the federation would reach without silos and without DP;
* local-only: the same reference procedure on each partner's own training customers (what a partner gets alone);
* personalised (when the global DP model is given): each partner's model derived from the global model and its
  own data (``clients.personalize.personalise``), which never leaves its node.

When the global model is given, ``local_only["paired_auc"][partner][head]`` also holds DeLong's paired comparison
(:mod:`federation.auc_compare`) on the partner's own test customers of the global (federated-DP) model and of
the personalised model against the local-only model: the AUC gain, its standard error and 95% interval. A
partner's test set is small; most such gains are within the noise, and this says which are not.

Every model is scored on the same held-out customers. Pooled metrics concatenate each partner's test customers;
for local-only and personalised models (one model per partner) "pooled" scores each partner's customers with
that partner's own model, so pooled compares with pooled and per-partner with per-partner.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from clients.node import PartnerData
from clients.personalize import PersonalisedModel, fit_reference, personalise
from federation import metrics as M
from federation.auc_compare import paired_auc_difference
from federation.config import FedpropConfig
from federation.models import predict_proba


class ReferenceModel:
    """One non-private reference per head (``clients.personalize.LocalModel``), scored like a torch model."""

    def __init__(self, heads: tuple[str, ...], per_head: dict[str, Any]):
        self.heads, self.per_head = heads, per_head

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        Xn = X.numpy()
        return np.stack([1 / (1 + np.exp(-np.clip(self.per_head[h].logit(Xn), -30, 30))) for h in self.heads], axis=1)

    def describe(self) -> dict[str, str]:
        return {h: m.kind for h, m in self.per_head.items()}


def fit_references(X: torch.Tensor, Y: torch.Tensor, heads: tuple[str, ...], *, seed: int) -> ReferenceModel:
    Xn, Yn = X.numpy(), Y.numpy()
    return ReferenceModel(heads, {h: fit_reference(Xn, Yn[:, j], seed=seed) for j, h in enumerate(heads)})


def scores(model: Any, X: torch.Tensor) -> np.ndarray:
    """[n, heads] probabilities of a torch logits model or of a reference / personalised model."""
    if isinstance(model, torch.nn.Module):
        return predict_proba(model, X).numpy()
    return np.asarray(model.predict_proba(X))


def head_metrics(model: Any, data: PartnerData) -> dict[str, dict[str, Any]]:
    P, Y = scores(model, data.X_test), data.Y_test.numpy()
    return {h: M.metrics_from_scores(Y[:, j], P[:, j]) for j, h in enumerate(data.heads)}


def pooled_metrics(model: Any, parts: list[PartnerData]) -> dict[str, dict[str, Any]]:
    """One model scores every partner's test customers."""
    return pooled_over({p.partition_id: model for p in parts}, parts)


def pooled_over(models: dict[int, Any], parts: list[PartnerData]) -> dict[str, dict[str, Any]]:
    """Each partner's test customers scored by ``models[partition_id]``, then pooled."""
    P = np.concatenate([scores(models[p.partition_id], p.X_test) for p in parts])
    Y = np.concatenate([p.Y_test.numpy() for p in parts])
    return {h: M.metrics_from_scores(Y[:, j], P[:, j]) for j, h in enumerate(parts[0].heads)}


def paired_vs(reference: Any, others: dict[str, Any], data: PartnerData, *,
              level: float = 0.95) -> dict[str, dict[str, dict[str, Any]]]:
    """``{head: {"<name>_vs_local_only": PairedAUC.as_dict()}}``: each of ``others`` (name -> model) against
    ``reference`` (the partner's local-only model), paired on ``data``'s test customers."""
    Y = data.Y_test.numpy()
    ref = scores(reference, data.X_test)
    P = {name: scores(m, data.X_test) for name, m in others.items()}
    return {h: {f"{name}_vs_local_only": paired_auc_difference(Y[:, j], P[name][:, j], ref[:, j], level=level).as_dict()
                for name in others} for j, h in enumerate(data.heads)}


def run_baselines(cfg: FedpropConfig, parts: list[PartnerData], *,
                  progress: Callable[[int, int, str], None] | None = None,
                  global_model: torch.nn.Module | None = None, personalise_models: bool = True) -> dict[str, Any]:
    """``progress(done, total, what)`` is called after each model (1 centralized + one local-only per partner,
    + one personalised per partner when ``global_model`` is given and ``personalise_models``).

    With ``global_model``: ``local_only["paired_auc"]`` (see the module docstring) compares it, and the
    personalised models, with each partner's local-only model on the partner's test customers."""
    heads = parts[0].heads
    personalising = global_model is not None and personalise_models
    total = 1 + len(parts) * (2 if personalising else 1)
    central = fit_references(torch.cat([p.X_train for p in parts]), torch.cat([p.Y_train for p in parts]), heads,
                             seed=cfg.seed)
    if progress:
        progress(1, total, f"centralized reference ({', '.join(f'{h}: {k}' for h, k in central.describe().items())}) "
                 f"on {sum(p.n_train for p in parts)} pooled training customers")
    out: dict[str, Any] = {
        "centralized": {"pooled": pooled_metrics(central, parts), "model": central.describe(),
                        "per_partner": {str(p.partition_id): head_metrics(central, p) for p in parts}},
        "local_only": {"per_partner": {}, "model": {}},
    }
    local: dict[int, ReferenceModel] = {}
    for i, p in enumerate(parts):
        local[p.partition_id] = fit_references(p.X_train, p.Y_train, heads, seed=cfg.seed + 1000 + p.partition_id)
        out["local_only"]["per_partner"][str(p.partition_id)] = head_metrics(local[p.partition_id], p)
        out["local_only"]["model"][str(p.partition_id)] = local[p.partition_id].describe()
        if progress:
            progress(2 + i, total, f"local-only reference of partner {p.partition_id}")
    out["local_only"]["pooled"] = pooled_over(local, parts)
    pers: dict[int, PersonalisedModel] = {}
    if personalising:
        out["personalised"] = {"per_partner": {}, "model": {}}
        for i, p in enumerate(parts):
            pers[p.partition_id] = personalise(global_model, p.X_train, p.Y_train, heads=heads,
                                               seed=cfg.seed + 2000 + p.partition_id,
                                               local=local[p.partition_id].per_head)  # alpha 0 = local-only
            out["personalised"]["per_partner"][str(p.partition_id)] = head_metrics(pers[p.partition_id], p)
            out["personalised"]["model"][str(p.partition_id)] = pers[p.partition_id].describe()
            if progress:
                progress(2 + len(parts) + i, total, f"personalised model of partner {p.partition_id}")
        out["personalised"]["pooled"] = pooled_over(pers, parts)
    if global_model is not None:
        out["local_only"]["paired_auc"] = {
            str(p.partition_id): paired_vs(local[p.partition_id], {"federated_dp": global_model, **(
                {"personalised": pers[p.partition_id]} if p.partition_id in pers else {})}, p) for p in parts}
    return out
