"""A real federation on Flower's simulation engine (Ray), on tiny synthetic partners. Kept in CI."""
import json
import math

from federation.config import from_dict
from simulations.simulate import run_simulation


def test_tiny_federation_end_to_end(tmp_path):
    cfg = from_dict({
        "partners": 3, "rounds": 3, "privacy": {"epsilon": 4.0}, "model": {"kind": "logreg", "hidden": []},
        "data": {"min_customers": 400, "max_customers": 1200}, "baselines": {"epochs": 10},
    })
    summary = run_simulation(cfg, tmp_path)
    for name in ("config.json", "federated_rounds.json", "federated_rounds.csv", "summary.json", "summary.md",
                 "model_churn+propensity.pt", "checkpoints/churn+propensity_round003.pt", "report.html", "report.md"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / ".partner-cache").exists()  # per-run feature cache is deleted with the run
    rounds = json.loads((tmp_path / "federated_rounds.json").read_text())["churn+propensity"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for pid in ("0", "1", "2"):
        eps = [r["partners"][pid]["train"]["epsilon"] for r in rounds]
        assert eps == sorted(eps) and eps[0] > 0 and eps[-1] <= 4.0 + 1e-9  # cumulative, within target
    churn = summary["tasks"]["churn"]
    assert churn["federated_dp_auc"] > 0.6
    assert churn["centralized_auc"] > 0.6 and not math.isnan(churn["local_only_auc_mean"])
    # the pooled AUC from partners' DP releases agrees with the exact pooled computation (same final model) within
    # its stated noise: 3 x the 95% half-width (~6 standard deviations)
    hw = churn["federated_eval_auc_half_width"]
    assert 0 < hw < 0.5
    dp_auc = churn["federated_eval_auc_from_histograms"]
    if dp_auc is None or math.isnan(dp_auc):  # the noisy counts of 3 tiny test sets left no AUC (seen once,
        assert not churn["federated_eval_auc_meaningful"]  # half-width 0.19): then the summary must say so
    else:
        assert abs(dp_auc - churn["federated_dp_auc"]) < 3 * hw + 0.02
