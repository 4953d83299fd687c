"""Secure FedAvg in fedprop's real training loop: arithmetic, distributed partner-level DP noise, and whole
federations driven in-process (fast) through the real ClientApp (DP-SGD train handler, privacy state,
refusals, ledgers) and the server loop of server/secure_fedavg.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

import clients.secure_update as SU
from clients.client_app import STATE_KEY, make_client_app
from clients.privacy_state import PrivacyState
from federation.config import FedpropConfig
from federation.privacy.ledger import verify
from tests.modelcheck import fresh_synthetic_auc
from federation.secure_fedavg import aggregate_step, partner_vector, plan_round, threshold_for
from server.outputs import RunOutputs, load_model
from server.secure_fedavg import LEDGER_FILE
from server.server_app import run_federation
from simulations.partners import load_partner

from .conftest import InProcessGrid, tiny_config

HEADS = ("churn", "propensity")
TAG = "churn+propensity"


# ------------------------------------------------------------------------------------ arithmetic (pure)
def test_weighted_vectors_sum_to_plain_fedavg(tmp_path):
    cfg = tiny_config(tmp_path)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.3, 50) for _ in range(4)]
    ns = [120, 3000, 480, 77]
    plan = plan_round(cfg, num_params=50, participants=4)
    vecs = [partner_vector(cfg, delta=d, num_examples=n, threshold=plan.threshold,
                           value_range_=plan.quantization.clip, rng=rng) for d, n in zip(deltas, ns)]
    step, weight = aggregate_step(np.sum(vecs, axis=0), value_range_=plan.quantization.clip, survivors=4,
                                  min_weight=1 / cfg.secagg.weight_cap, error_bound=1e-9)
    expected = np.sum([n * d for n, d in zip(ns, deltas)], axis=0) / sum(ns)
    assert np.allclose(step, expected, atol=1e-12) and math.isclose(weight, sum(ns) / cfg.secagg.weight_cap)
    assert all(v[-1] <= plan.quantization.clip and np.abs(v).max() <= plan.quantization.clip for v in vecs)


def test_threshold_never_a_minority(tmp_path):
    cfg = tiny_config(tmp_path)
    assert [threshold_for(cfg, n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    assert all(threshold_for(cfg, n) > n / 2 for n in range(2, 50))


@pytest.mark.parametrize("survivors,source", [(3, "numpy"), (5, "numpy"), (3, "chacha")])
def test_distributed_noise_gives_the_aggregate_at_least_sigma_c(tmp_path, survivors, source):
    """Each of the summed partners adds N(0, (sigma C)^2 / t): with t survivors the sum's noise std is
    exactly sigma * C; with more it is sigma * C * sqrt(k / t) (over-noising, never under). "chacha" is the
    nodes' source (clients/secure_update.py: a ChaCha20 keystream keyed by os.urandom, not a seeded PCG64)."""
    from clients.noise import ChaChaNoise

    cfg = tiny_config(tmp_path, central_dp={"enabled": True, "noise_multiplier": 0.8, "clipping_norm": 0.5})
    t = 3
    rng = np.random.default_rng(1) if source == "numpy" else ChaChaNoise()
    d = 40_000
    huge = np.full(d, 1.0)  # L2 norm 200, clipped to C = 0.5
    vecs = [partner_vector(cfg, delta=huge, num_examples=10, threshold=t, value_range_=1.0, rng=rng)
            for _ in range(survivors)]
    total = np.sum(vecs, axis=0)
    noise = total[:-1] - survivors * huge * (0.5 / np.linalg.norm(huge))
    target = 0.8 * 0.5 * math.sqrt(survivors / t)
    # sample std of 40k normals: relative standard error ~ 1/sqrt(2 * 40k) = 0.35 %; allow 5 of them
    assert abs(noise.std() / target - 1) < 0.018
    assert abs(noise.mean()) < 5 * target / math.sqrt(d)
    assert total[-1] == survivors * 1.0  # equal weights with central DP: the weight sum is the public count


# ---------------------------------------------------------------------------- in-process federations
def _federate(cfg: FedpropConfig, tmp_path, grid_kwargs=None, prepare=None):
    app = make_client_app(config=cfg, loader=load_partner)
    grid = InProcessGrid(app, cfg.partners, **(grid_kwargs or {}))
    if prepare:
        prepare(grid)
    out = RunOutputs(tmp_path / "run")
    out.write_config(cfg)
    run_federation(grid, cfg, heads=HEADS, out=out, run_id="test-run")
    rounds = json.loads((tmp_path / "run" / "federated_rounds.json").read_text())[TAG]
    return grid, out, rounds


def _flat(sd: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([v.detach().numpy().astype(np.float64).ravel() for v in sd.values()])


def test_secure_rounds_equal_plain_fedavg_of_the_same_deltas(tmp_path, monkeypatch):
    seen: list[tuple[np.ndarray, int]] = []
    real = SU.partner_vector

    def spy(cfg, *, delta, num_examples, **kw):
        seen.append((np.array(delta), int(num_examples)))
        return real(cfg, delta=delta, num_examples=num_examples, **kw)

    monkeypatch.setattr(SU, "partner_vector", spy)
    cfg = tiny_config(tmp_path)
    grid, out, rounds = _federate(cfg, tmp_path)
    assert [r["secagg"]["survivors"] for r in rounds] == [3, 3] and len(seen) == 6
    prev = None
    for rnd in (1, 2):
        sd, _ = load_model(out.dir / "checkpoints" / f"{TAG}_round{rnd:03d}.pt")
        batch = seen[3 * (rnd - 1): 3 * rnd]
        fedavg = sum(n * d for d, n in batch) / sum(n for _, n in batch)  # plain FedAvg by num-examples
        assert all(np.abs(d).max() < cfg.secagg.clip for d, _ in batch)  # the clip did not bind
        if prev is not None:
            assert np.abs(_flat(sd) - (prev + fedavg)).max() < 1e-6  # float32 model; quantization ~1e-10
        prev = _flat(sd)
    assert (out.dir / f"model_{TAG}.pt").exists()
    auc = fresh_synthetic_auc(cfg, out.dir / f"model_{TAG}.pt", "churn")  # the model learned (exact, not the DP AUC)
    print(f"secure federation: churn AUC on fresh synthetic customers {auc:.3f}")
    assert auc > 0.6
    # The server process never receives an update in the clear: only the masked vectors (and metrics).
    for (d, _n) in seen:
        assert d.astype("<f8").tobytes()[:64] not in b"".join(
            bytes(v) for r in grid.received if not r.has_error() for rec in r.content.config_records.values()
            for v in rec.values() if isinstance(v, bytes))


def test_a_refusing_partner_is_a_dropout_and_the_round_completes(tmp_path):
    cfg = tiny_config(tmp_path, rounds=1)

    def exhaust_partner_1(grid):
        # partner 1 already spent far more than its run budget: its train handler refuses before touching data
        spent = PrivacyState(target_epsilon=4.0, delta=1e-5, noise_multiplier=0.5, sample_rate=0.3,
                             steps_per_round=4, planned_rounds=2, max_grad_norm=1.0, history=[(0.5, 0.3, 400)])
        grid.contexts[1001].state[f"{STATE_KEY}.churn,propensity"] = ConfigRecord({"json": spent.to_json()})

    _, _, rounds = _federate(cfg, tmp_path, prepare=exhaust_partner_1)
    [r] = rounds
    assert r["secagg"]["survivors"] == 2 and r["secagg"]["dropped"] == 1
    # partner 1's (exhausted) privacy state has no evaluation release planned: it releases nothing at all
    assert set(r["partners"]) == {"0", "2"}
    [refusal] = r["refusals"]
    assert refusal["stage"] == "masked_input" and "refusing to train" in refusal["reason"]
    # evaluation is a DP release: its AUC is noisy, so check it only within its stated noise
    hw, auc = r["evaluate"]["churn.auc_roc_half_width"], r["evaluate"]["churn.auc_roc"]
    if auc is None:  # NaN in the round record: the noisy counts of 2 tiny partners left no AUC (a few % of runs)
        assert r["evaluate"]["churn.auc_roc_meaningful"] == 0
    else:
        assert 0 < hw and auc > 0.5 - 2 * hw


def test_vanished_partner_and_too_few_survivors(tmp_path):
    off = {"enabled": False, "ledger_dir": str(tmp_path / "ledgers")}  # protocol behaviour: no DP-SGD needed
    cfg = tiny_config(tmp_path, partners=4, rounds=1, privacy=off)
    _, _, rounds = _federate(cfg, tmp_path, grid_kwargs={"vanish": {3: "unmask"}})
    assert rounds[0]["secagg"]["survivors"] == 4  # it sent its masked input, then vanished: still summed
    cfg = tiny_config(tmp_path / "b", partners=3, rounds=1, privacy=off)
    from server.server_app import ReleaseRefused

    with pytest.raises(ReleaseRefused, match="0 of 1 round"):  # nothing aggregated: nothing is released
        _federate(cfg, tmp_path / "b", grid_kwargs={"vanish": {0: "masked_input", 1: "masked_input"}})
    rounds = json.loads((tmp_path / "b" / "run" / "federated_rounds.json").read_text())[TAG]
    assert "aborted" in rounds[0]["secagg"] and "survivors" not in rounds[0]["secagg"]
    run = tmp_path / "b" / "run"
    assert not (run / f"model_{TAG}.pt").exists() and not list(run.glob("*.sig")) and not list(run.glob("model_card*"))
    assert (run / f"RELEASE_REFUSED_{TAG}.json").exists()


def test_central_dp_rounds_are_recorded_in_the_federation_ledger(tmp_path):
    cfg = tiny_config(tmp_path, central_dp={"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5},
                      privacy={"enabled": False})  # partner-level DP alone (customer-level DP-SGD tested above)
    _, out, rounds = _federate(cfg, tmp_path)
    eps = [r["secagg"]["partner_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]
    ledger = out.dir / LEDGER_FILE
    key_pub = tmp_path / "keys" / "federation-ledger.key.pub"  # release.key_dir: the server's key, not the run dir's
    assert not list(out.dir.glob("*.key")) and not list(out.dir.glob("*.key.pub"))
    assert verify(ledger, key_pub).entries == 2  # hash chain and Ed25519 signatures check out
    from federation.privacy.ledger import Ledger

    with Ledger.open(ledger, signing_key=None) as opened:
        entries = opened.entries()
    assert [e.kind for e in entries] == ["server_dp_round", "server_dp_round"]
    assert [e.round for e in entries] == [1, 2] and all(e.privacy_unit == "partner" for e in entries)
    assert entries[0].mechanism["noise_multiplier"] == 1.0 and entries[0].clipping_norm == 0.5
    assert entries[0].extra["threshold"] == 2 and entries[0].extra["survivors"] == 3


def test_both_dp_layers_share_one_federation_ledger_and_key(tmp_path):
    """Customer-level DP-SGD at the partners AND partner-level distributed noise (the documented combination): the
    round's server_dp_round entry and the partner heads witness go to the one federation ledger under the one server
    key. (They used two keys, the run dir's and release.key_dir's, and the witness of round 1 raised
    LedgerIntegrityError: every such run died after its first round.)"""
    cfg = tiny_config(tmp_path, central_dp={"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 0.5})
    _, out, rounds = _federate(cfg, tmp_path)
    assert len(rounds) == 2
    from federation.privacy.ledger import Ledger, verify_against

    fed_pub = tmp_path / "keys" / "federation-ledger.key.pub"
    verify(out.dir / LEDGER_FILE, fed_pub)
    with Ledger.open(out.dir / LEDGER_FILE, signing_key=None) as opened:
        kinds = [e.kind for e in opened.entries()]
    assert kinds.count("server_dp_round") == 2 and kinds.count("partner_heads") == 2
    ledger = tmp_path / "ledgers" / cfg.data.name / "partner-0.sqlite"
    pub = tmp_path / "ledgers-keys" / cfg.data.name / "partner-0.key.pub"
    assert verify_against(ledger, out.dir / LEDGER_FILE, public_key=pub, federation_public_key=fed_pub).heads_checked >= 2


def test_a_hostile_evaluation_release_is_set_aside_in_a_secure_round(tmp_path):
    """A partner whose evaluation reply carries NaN counts (a hostile or broken node) used to fail the secure
    round's evaluation pooling (DataValidationError in the server); now it is set aside and the run completes."""
    from .conftest import InProcessGrid

    class Corrupting(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)
            for r in out:
                if not r.has_error() and r.metadata.message_type == "evaluate" and r.metadata.src_node_id == 1001:
                    rec = next(iter(r.content.metric_records.values()))
                    for k in [k for k in rec if k.endswith(".hist.pos")]:
                        rec[k] = [float("nan")] * len(rec[k])
            return out

    cfg = tiny_config(tmp_path, rounds=1)
    app = make_client_app(config=cfg, loader=load_partner)
    grid = Corrupting(app, cfg.partners)
    out = RunOutputs(tmp_path / "run")
    out.write_config(cfg)
    run_federation(grid, cfg, heads=HEADS, out=out, run_id="test-run")
    [r] = json.loads((tmp_path / "run" / "federated_rounds.json").read_text())[TAG]
    [refusal] = r["evaluate_refusals"]
    assert refusal["code"] == "invalid-update" and refusal["partner"] == "1" and "finite counts" in refusal["reason"]
    assert "1" not in {k for k, v in r["partners"].items() if "evaluate" in v}
    assert "churn.auc_roc" in r["evaluate"] and (out.dir / f"model_{TAG}.pt").exists()
