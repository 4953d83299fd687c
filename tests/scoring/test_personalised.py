"""`fedprop personalise` and `fedprop score --personalised`: the partner's own model, saved without pickle,
scored only next to the global model it came from; files edited on disk are refused, never executed."""
from __future__ import annotations

import io
import json
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from clients.personal_store import JSON_NAME, NPZ_NAME, PersonalisedModelError, load, save
from clients.personalize import HeadChoice, LocalModel, PersonalisedModel, fine_tune
from federation.config import ModelConfig
from federation.models import build_model
from simulations.cli import main as fedprop
from tests.report.runfixture import make_run

MODEL = "model_churn+propensity.pt"
CONTRACT = "contracts/synthetic_events.yaml"
HEADS = ("churn", "propensity")


def _data(n=500, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d)).astype(np.float32)
    z = np.stack([3 * X[:, 0] - 2 * (X[:, 1] > 0.5) + X[:, 2] * X[:, 3] * 4 - 1.5,
                  -2 * X[:, 4] + 2 * (X[:, 5] > 0.3) - 0.3], 1)
    Y = (rng.random((n, 2)) < 1 / (1 + np.exp(-3 * z))).astype(np.float32)
    return torch.from_numpy(X), torch.from_numpy(Y)


def _local(kind, X, y):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "hist_gbm":
        est = HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=15, random_state=0)
    else:
        est = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    return LocalModel(kind if kind == "hist_gbm" else "logreg(C=1)", est.fit(X, y))


def _model(X, Y, choices):
    torch.manual_seed(0)
    g = build_model(ModelConfig(kind="logreg", hidden=[]), n_features=X.shape[1], n_outputs=2)
    Xn, Yn = X.numpy(), Y.numpy()
    local, stacked, tuned = {}, {}, {}
    glog = torch.log(torch.sigmoid(g(X))).detach().numpy()  # any fixed feature works for the stacking check
    for j, h in enumerate(HEADS):
        c = choices[h]
        if c.kind in ("local", "blend"):
            local[h] = _local(c.local_kind, Xn, Yn[:, j])
        elif c.kind == "stack":
            from clients.personalize import _logit
            from federation.models import predict_proba

            glog = _logit(predict_proba(g, X).numpy()[:, j])
            stacked[h] = _local(c.local_kind, np.c_[Xn, glog], Yn[:, j])
        elif c.kind == "fine_tune":
            tuned[h] = fine_tune(g, X, Y, epochs=2, seed=0)
    return PersonalisedModel(HEADS, g, choices, local, tuned, stacked)


@pytest.mark.parametrize("churn,propensity", [
    (HeadChoice("blend", alpha=0.35, local_kind="hist_gbm"), HeadChoice("local", alpha=0.0, local_kind="logreg")),
    (HeadChoice("stack", local_kind="hist_gbm"), HeadChoice("fine_tune", epochs=2)),
    (HeadChoice("stack", local_kind="logreg"), HeadChoice("global")),
])
def test_saved_model_scores_exactly_as_the_fitted_one(tmp_path, churn, propensity):
    X, Y = _data()
    pm = _model(X, Y, {"churn": churn, "propensity": propensity})
    names = tuple(f"f{i}" for i in range(X.shape[1]))
    save(pm, tmp_path / "p", global_sha256="a" * 64, key_fingerprint="sha256:x", contract_name="c",
         contract_hash="h", feature_names=names, customers=len(X), seed=0)
    assert stat.S_IMODE((tmp_path / "p").stat().st_mode) == 0o700
    assert all(stat.S_IMODE((tmp_path / "p" / f).stat().st_mode) == 0o600 for f in (JSON_NAME, NPZ_NAME))
    back, meta = load(tmp_path / "p", pm.global_model, global_sha256="a" * 64, contract_hash="h",
                      feature_names=names, heads=HEADS)
    Xt, _ = _data(n=300, seed=1)  # customers neither model saw
    want, got = pm.predict_proba(Xt), back.predict_proba(Xt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.std(want[:, 0]) > 0.05  # not a constant model that would match anything
    assert back.describe() == pm.describe() and "NOT a DP release" in meta["privacy"]


def _saved(tmp_path):
    X, Y = _data()
    pm = _model(X, Y, {"churn": HeadChoice("blend", alpha=0.5, local_kind="hist_gbm"),
                       "propensity": HeadChoice("local", alpha=0.0, local_kind="logreg")})
    names = tuple(f"f{i}" for i in range(X.shape[1]))
    d = tmp_path / "p"
    save(pm, d, global_sha256="a" * 64, key_fingerprint="k", contract_name="c", contract_hash="h",
         feature_names=names, customers=500, seed=0)
    return pm, d, names


def _rewrite(d, edit):
    """An attacker who can write the folder: edit the arrays and fix the checksum in the JSON."""
    arrays = dict(np.load(d / NPZ_NAME, allow_pickle=False))
    edit(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (d / NPZ_NAME).write_bytes(buf.getvalue())
    import hashlib

    meta = json.loads((d / JSON_NAME).read_text())
    meta["arrays_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (d / JSON_NAME).write_text(json.dumps(meta))


def test_edited_or_foreign_files_are_refused(tmp_path):
    pm, d, names = _saved(tmp_path)
    ok = dict(global_sha256="a" * 64, contract_hash="h", feature_names=names, heads=HEADS)
    load(d, pm.global_model, **ok)
    with pytest.raises(PersonalisedModelError, match="derived from global model"):
        load(d, pm.global_model, **{**ok, "global_sha256": "b" * 64})
    with pytest.raises(PersonalisedModelError, match="another data contract"):
        load(d, pm.global_model, **{**ok, "contract_hash": "other"})
    raw = (d / NPZ_NAME).read_bytes()
    (d / NPZ_NAME).write_bytes(raw[:-10])  # partly written
    with pytest.raises(PersonalisedModelError, match="checksum"):
        load(d, pm.global_model, **ok)
    (d / NPZ_NAME).write_bytes(raw)

    def loop(a):  # a child pointing back at the root: a walk that never ends
        a["churn/local/left"][0] = 0

    _rewrite(d, loop)
    with pytest.raises(PersonalisedModelError, match="left child out of range"):
        load(d, pm.global_model, **ok)
    (d / NPZ_NAME).write_bytes(raw)

    def pickled(a):  # an object array: numpy would need pickle to read it
        a["churn/local/value"] = np.array([{"x": 1}], dtype=object)

    _rewrite(d, pickled)
    with pytest.raises(PersonalisedModelError, match="unreadable"):
        load(d, pm.global_model, **ok)


# ------------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    return root, make_run(root / "run", root / "keys", rounds=1), make_run(root / "run2", root / "keys", rounds=1, seed=5)


def _cli(capsys, *args):
    rc = fedprop([*map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def test_personalise_then_score_with_it_and_only_with_its_global_model(two_runs, events_csv, tmp_path, capsys):
    root, run, other = two_runs
    key = root / "keys" / "server.pub"
    rc, out, err = _cli(capsys, "personalise", "--model", run / MODEL, "--public-key", key, "--data", events_csv,
                        "--contract", CONTRACT, "--out", tmp_path / "mine")
    assert rc == 0, err
    assert "NOT a DP release" in out and "cross-validated AUC" in out
    meta = json.loads((tmp_path / "mine" / JSON_NAME).read_text())
    rc, out, err = _cli(capsys, "score", "--model", run / MODEL, "--public-key", key, "--data", events_csv,
                        "--contract", CONTRACT, "--out", tmp_path / "p.csv", "--personalised", tmp_path / "mine")
    assert rc == 0, err
    assert "models: churn: " in out and "personalised" in err  # the calibration caveat names the model
    rc, _, err = _cli(capsys, "score", "--model", run / MODEL, "--public-key", key, "--data", events_csv,
                      "--contract", CONTRACT, "--out", tmp_path / "g.csv")
    assert rc == 0, err
    p, g = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "g.csv")
    assert (p["customer_id"] == g["customer_id"]).all()
    if any(c["choice"]["kind"] != "global" for c in meta["choices"].values()):
        assert not np.allclose(p["churn_probability"], g["churn_probability"]) or \
            not np.allclose(p["propensity_score"], g["propensity_score"])
    # next to another global model (a new release) the personalised model is refused, nothing written
    rc, _, err = _cli(capsys, "score", "--model", other / MODEL, "--public-key", key, "--data", events_csv,
                      "--contract", CONTRACT, "--out", tmp_path / "x.csv", "--personalised", tmp_path / "mine")
    assert rc == 1 and "REFUSED" in err and "derived from global model" in err
    assert not (tmp_path / "x.csv").exists()


def test_personalise_refuses_an_unpinned_or_wrong_key(two_runs, events_csv, tmp_path, capsys):
    from federation.signing import generate_keypair

    root, run, _ = two_runs
    rc, _, err = _cli(capsys, "personalise", "--model", run / MODEL, "--data", events_csv, "--contract", CONTRACT,
                      "--out", tmp_path / "mine")
    assert rc == 2 and "pinned" in err
    generate_keypair(tmp_path / "attacker.key", tmp_path / "attacker.pub")
    rc, _, err = _cli(capsys, "personalise", "--model", run / MODEL, "--public-key", tmp_path / "attacker.pub",
                      "--data", events_csv, "--contract", CONTRACT, "--out", tmp_path / "mine")
    assert rc == 1 and "REFUSED" in err
    assert not (tmp_path / "mine").exists()
