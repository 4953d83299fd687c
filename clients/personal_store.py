"""A partner's personalised model on its own disk, in a format that runs no code when read.

``save(model, out_dir, ...)`` writes ``personalised.json`` (what was chosen, from which global model, under which
contract) and ``personalised.npz`` (every number: scaler, coefficients, tree nodes, fine-tuned weights), both
mode 0600 in a 0700 folder, atomically. ``load(dir, global_model, ...)`` reads them back with
``numpy.load(allow_pickle=False)`` and plain JSON: no pickle, no torch.load of arbitrary objects, so a file an
attacker placed there can at worst give wrong scores, never run code. Every index and shape is checked before
use (a tree whose child points outside the tree, a coefficient vector of the wrong length: refused, naming the
file).

What it does NOT protect: the files are not signed. Whoever can write the node's disk can replace them (as they
could replace the customer data the scores are computed from); ``fedprop score`` only checks that they were
derived from the very global model it verified (its SHA-256) and the same contract. The personalised model is a
non-private function of the partner's customers: it never leaves the node and is not a DP release
(``clients.personalize``).

Supported local models: ``logreg(C=..)`` (StandardScaler + LogisticRegression), ``hist_gbm``
(HistGradientBoostingClassifier with numeric splits: the fitted trees are exported node by node and evaluated
here exactly as scikit-learn does), ``constant``.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from federation.errors import FedpropError

FORMAT = "fedprop-personalised/1"
JSON_NAME, NPZ_NAME = "personalised.json", "personalised.npz"


class PersonalisedModelError(FedpropError):
    """The personalised model folder is missing, unreadable, or does not belong to this global model."""


# ------------------------------------------------------------------ estimators rebuilt from arrays
class ArrayLogreg:
    """StandardScaler + binary LogisticRegression from its arrays; ``predict_proba`` as scikit-learn computes it."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float):
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, float(intercept)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        z = ((np.asarray(X, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        p = expit(z)
        return np.c_[1 - p, p]


class ArrayTrees:
    """A binary HistGradientBoostingClassifier's trees: raw score = baseline + sum of leaf values, where a sample
    goes left at a node iff its feature is <= the threshold (or is NaN and missing values go left)."""

    def __init__(self, baseline: float, feature: np.ndarray, threshold: np.ndarray, missing_left: np.ndarray,
                 left: np.ndarray, right: np.ndarray, leaf: np.ndarray, value: np.ndarray, roots: np.ndarray):
        self.baseline = float(baseline)
        self.feature, self.threshold, self.missing_left = feature, threshold, missing_left
        self.left, self.right, self.leaf, self.value, self.roots = left, right, leaf, value, roots

    def raw(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        rows = np.arange(len(X))
        out = np.full(len(X), self.baseline)
        for root in self.roots:  # in order: the same summation order as scikit-learn's raw prediction
            node = np.full(len(X), root, dtype=np.int64)
            while True:
                inner = ~self.leaf[node]
                if not inner.any():
                    break
                n = node[inner]
                x = X[rows[inner], self.feature[n]]
                go_left = np.where(np.isnan(x), self.missing_left[n], x <= self.threshold[n])
                node[inner] = np.where(go_left, self.left[n], self.right[n])
            out += self.value[node]
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        p = expit(self.raw(X))
        return np.c_[1 - p, p]


class ArrayConstant:
    """A one-class training set's model (``LocalModel.logit`` gives +-30)."""

    def __init__(self, cls: int):
        self.classes_ = np.array([int(cls)])


# ------------------------------------------------------------------ export
def _export_local(local, prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    est = local.estimator
    if local.kind == "constant":
        return {"kind": "constant", "type": "constant", "class": int(est.classes_[0])}
    if local.kind.startswith("logreg"):
        scaler, lr = est.named_steps["standardscaler"], est.named_steps["logisticregression"]
        if list(lr.classes_) != [0.0, 1.0] and list(lr.classes_) != [0, 1]:
            raise PersonalisedModelError(f"cannot export {local.kind}: classes {list(lr.classes_)} are not [0, 1]")
        arrays[prefix + "mean"] = np.asarray(scaler.mean_, np.float64)
        arrays[prefix + "scale"] = np.asarray(scaler.scale_, np.float64)
        arrays[prefix + "coef"] = np.asarray(lr.coef_[0], np.float64)
        return {"kind": local.kind, "type": "logreg", "intercept": float(lr.intercept_[0])}
    if local.kind == "hist_gbm":
        if getattr(est, "n_trees_per_iteration_", 1) != 1:
            raise PersonalisedModelError("cannot export hist_gbm: not a binary classifier")
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("feature", "threshold", "missing_left", "left", "right",
                                                             "leaf", "value")}
        roots, offset = [], 0
        for (pred,) in est._predictors:
            nd = pred.nodes
            if nd["is_categorical"].any():
                raise PersonalisedModelError("cannot export hist_gbm with categorical splits")
            roots.append(offset)
            cols["feature"].append(nd["feature_idx"].astype(np.int64))
            cols["threshold"].append(nd["num_threshold"].astype(np.float64))
            cols["missing_left"].append(nd["missing_go_to_left"].astype(bool))
            cols["left"].append(nd["left"].astype(np.int64) + offset)
            cols["right"].append(nd["right"].astype(np.int64) + offset)
            cols["leaf"].append(nd["is_leaf"].astype(bool))
            cols["value"].append(nd["value"].astype(np.float64))
            offset += len(nd)
        for k, v in cols.items():
            arrays[prefix + k] = np.concatenate(v) if v else np.zeros(0)
        arrays[prefix + "roots"] = np.asarray(roots, np.int64)
        return {"kind": "hist_gbm", "type": "trees", "baseline": float(np.ravel(est._baseline_prediction)[0])}
    raise PersonalisedModelError(f"cannot export a local model of kind {local.kind!r}")


def save(model, out_dir: str | Path, *, global_sha256: str, key_fingerprint: str, contract_name: str,
         contract_hash: str, feature_names: tuple[str, ...], customers: int, seed: int) -> Path:
    """Write ``model`` (a ``clients.personalize.PersonalisedModel``) to ``out_dir``; return the JSON's path."""
    from federation.atomicio import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {}
    heads: dict[str, Any] = {}
    for h in model.heads:
        c = model.choices[h]
        entry: dict[str, Any] = {"choice": asdict(c), "describe": model.describe()[h]}
        if c.kind in ("local", "blend"):
            entry["local"] = _export_local(model.local[h], f"{h}/local/", arrays)
        elif c.kind == "stack":
            entry["stacked"] = _export_local(model.stacked[h], f"{h}/stacked/", arrays)
        elif c.kind == "fine_tune":
            for k, v in model.tuned[h].state_dict().items():
                arrays[f"{h}/tuned/{k}"] = v.detach().cpu().numpy()
            entry["tuned"] = sorted(k for k in model.tuned[h].state_dict())
        heads[h] = entry
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz = buf.getvalue()
    meta = {"format": FORMAT, "heads": list(model.heads), "choices": heads,
            "global_model_sha256": global_sha256, "key_fingerprint": key_fingerprint,
            "contract": {"name": contract_name, "hash": contract_hash}, "feature_names": list(feature_names),
            "customers": int(customers), "seed": int(seed), "arrays_sha256": hashlib.sha256(npz).hexdigest(),
            "privacy": "NOT a DP release: a non-private function of this partner's customers; never send it off "
                       "the node"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    atomic_write_bytes(out / NPZ_NAME, npz, mode=0o600)
    return atomic_write_bytes(out / JSON_NAME, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o600)


# ------------------------------------------------------------------ import
def _need(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise PersonalisedModelError(f"{path}: {what}; rerun `fedprop personalise` to rebuild it")


def _import_local(spec: dict, prefix: str, arrays, n_features: int, path: Path):
    from clients.personalize import LocalModel

    t = spec.get("type")
    if t == "constant":
        return LocalModel("constant", ArrayConstant(int(spec["class"])))
    if t == "logreg":
        a = {k: arrays.get(prefix + k) for k in ("mean", "scale", "coef")}
        _need(all(v is not None and v.shape == (n_features,) and v.dtype == np.float64 for v in a.values()),
              path, f"{prefix}: logistic regression arrays missing or not of length {n_features}")
        _need(bool(np.all(np.isfinite(a["scale"])) and np.all(a["scale"] != 0)), path, f"{prefix}: zero scale")
        return LocalModel(str(spec["kind"]), ArrayLogreg(a["mean"], a["scale"], a["coef"], float(spec["intercept"])))
    if t == "trees":
        keys = ("feature", "threshold", "missing_left", "left", "right", "leaf", "value", "roots")
        a = {k: arrays.get(prefix + k) for k in keys}
        _need(all(v is not None and v.ndim == 1 for v in a.values()), path, f"{prefix}: tree arrays missing")
        m = len(a["feature"])
        _need(all(len(a[k]) == m for k in keys[:-1]) and m > 0, path, f"{prefix}: tree arrays of unequal length")
        inner = ~a["leaf"].astype(bool)
        roots = a["roots"].astype(np.int64)
        _need(bool(np.all((roots >= 0) & (roots < m))), path, f"{prefix}: a tree root outside the node table")
        for k in ("left", "right"):  # children strictly after their parent: every walk ends at a leaf
            ch = a[k].astype(np.int64)[inner]
            _need(bool(np.all((ch > np.nonzero(inner)[0]) & (ch < m))), path, f"{prefix}: a {k} child out of range")
        f = a["feature"].astype(np.int64)[inner]
        _need(bool(np.all((f >= 0) & (f < n_features))), path, f"{prefix}: a split on a feature the model lacks")
        return LocalModel("hist_gbm", ArrayTrees(float(spec["baseline"]), a["feature"].astype(np.int64),
                                                 a["threshold"].astype(np.float64), a["missing_left"].astype(bool),
                                                 a["left"].astype(np.int64), a["right"].astype(np.int64),
                                                 a["leaf"].astype(bool), a["value"].astype(np.float64), roots))
    raise PersonalisedModelError(f"{path}: unknown local model type {t!r}")


def load(model_dir: str | Path, global_model, *, global_sha256: str, contract_hash: str,
         feature_names: tuple[str, ...], heads: tuple[str, ...]):
    """The personalised model saved in ``model_dir``, refused unless it was derived from the global model with
    SHA-256 ``global_sha256`` (the verified one), under ``contract_hash``, for these features and heads."""
    import torch

    from clients.personalize import HeadChoice, PersonalisedModel

    d = Path(model_dir)
    jp, npath = d / JSON_NAME, d / NPZ_NAME
    if not jp.is_file() or not npath.is_file():
        raise PersonalisedModelError(f"{d}: no personalised model here ({JSON_NAME} and {NPZ_NAME}); create one "
                                     "with `fedprop personalise`")
    try:
        meta = json.loads(jp.read_text())
        raw = npath.read_bytes()
    except (OSError, ValueError) as exc:
        raise PersonalisedModelError(f"{jp}: unreadable ({exc})") from None
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, jp, f"not a {FORMAT} file")
    _need(hashlib.sha256(raw).hexdigest() == meta.get("arrays_sha256"), npath,
          "does not match the checksum in personalised.json (partly written or edited)")
    if meta.get("global_model_sha256") != global_sha256:
        raise PersonalisedModelError(
            f"{d} was derived from global model sha256 {str(meta.get('global_model_sha256'))[:12]}, not from the "
            f"verified model {global_sha256[:12]}: the federation released a new model since; rerun "
            "`fedprop personalise` with it")
    if meta.get("contract", {}).get("hash") != contract_hash:
        raise PersonalisedModelError(f"{d} was built under another data contract (hash "
                                     f"{str(meta.get('contract', {}).get('hash'))[:12]}); rerun `fedprop personalise`")
    _need(tuple(meta.get("feature_names", ())) == tuple(feature_names) and tuple(meta.get("heads", ())) == tuple(heads),
          jp, "features or heads differ from the global model's")
    try:
        arrays = dict(np.load(io.BytesIO(raw), allow_pickle=False))
    except ValueError as exc:
        raise PersonalisedModelError(f"{npath}: unreadable ({exc})") from None
    n = len(feature_names)
    choices, local, tuned, stacked = {}, {}, {}, {}
    fields = set(HeadChoice.__dataclass_fields__)
    for h in heads:
        e = meta["choices"].get(h)
        _need(isinstance(e, dict) and isinstance(e.get("choice"), dict), jp, f"no choice for head {h!r}")
        ch = {k: v for k, v in e["choice"].items() if k in fields}
        _need(ch.get("kind") in ("global", "local", "fine_tune", "blend", "stack"), jp, f"unknown choice for {h!r}")
        c = HeadChoice(**ch)
        choices[h] = c
        if c.kind in ("local", "blend"):
            local[h] = _import_local(e.get("local", {}), f"{h}/local/", arrays, n, npath)
        elif c.kind == "stack":
            stacked[h] = _import_local(e.get("stacked", {}), f"{h}/stacked/", arrays, n + 1, npath)
        elif c.kind == "fine_tune":
            m = copy.deepcopy(global_model)
            want = m.state_dict()
            got = {k: arrays.get(f"{h}/tuned/{k}") for k in want}
            _need(all(v is not None and tuple(v.shape) == tuple(want[k].shape) for k, v in got.items()), npath,
                  f"fine-tuned weights of {h!r} missing or of the wrong shape")
            m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(want[k].dtype) for k, v in got.items()})
            m.eval()
            tuned[h] = m
    pm = PersonalisedModel(tuple(heads), global_model, choices, local, tuned, stacked)
    return pm, meta
