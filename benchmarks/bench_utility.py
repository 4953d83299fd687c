"""Utility of the federation at fixed epsilon, per bundled dataset: fed-DP vs the strong centralized reference,
local-only and personalised models, partner by partner.

    python benchmarks/bench_utility.py                              # 4 bundled datasets x epsilon 1, 3
    python benchmarks/bench_utility.py --data telco_churn --eps 1 --set train.lr=0.5

Runs the federation IN PROCESS (no Flower/Ray: the same partner code, ``clients.node.train_round``, the same DP
calibration ``clients.node.initial_privacy_state``, FedAvg weighted by the public size bucket as
``server/strategy.py``), so a dataset x epsilon takes seconds. Noise is ``privacy.noise=fast`` (a torch generator
seeded from the OS CSPRNG: the same mechanism as secure mode, faster; two runs differ). Exact metrics on each
partner's keyed-hash test split; the centralized / local-only references are ``simulations.baselines``
(best of tuned logistic regression and HistGradientBoosting, chosen on validation data, never on test).

Prints per dataset: fed-DP / centralized pooled AUC ratio, share of partners whose fed-DP (personalised) model
beats its local-only model on its own test customers, ECE of the released model (and of the personalised models,
calibrated at each node, pooled), and whether training diverged
(the driver computes the released model's mean training loss on every partner's training data and compares it
with the round-1 model's; only a simulation can, no such loss leaves a node). The closing "All runs:" line
also counts the partner-runs whose personalised (fed-DP) model is SIGNIFICANTLY better or worse than its
local-only model (95% paired DeLong test on the partner's own test customers, ``federation.auc_compare``): with
a few hundred test customers most differences are noise.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = ("telco_churn", "iranian_churn", "bank_marketing", "online_retail")
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    """The typed config ``fedprop simulate <overrides>`` would run, resolved for its dataset."""
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf

    from federation.config import from_dict
    from simulations.partners import resolve_for_data
    from simulations.simulate import _register_schema

    _register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dcfg = hcompose(config_name="config", overrides=overrides)
    return resolve_for_data(from_dict(OmegaConf.to_container(dcfg, resolve=True)))


def thermometer(parts, bins: int):
    """EXPERIMENT (not in the product yet): add, for every numeric feature (already on [0, 1] by its declared
    bounds), the indicators x > i / bins for i = 1..bins-1. Public, data-independent thresholds: no privacy cost;
    it lets a linear model fit a step function of each feature. Every model (fed-DP and the references) sees the
    same columns."""
    import dataclasses

    import torch

    names = parts[0].feature_names
    num = [i for i, n in enumerate(names) if "=" not in n]  # one-hot columns are named "<feature>=<value>"
    t = torch.tensor([i / bins for i in range(1, bins)])

    def enc(X):
        return torch.cat([X, (X[:, num][:, :, None] > t).float().reshape(len(X), -1)], 1)

    extra = tuple(f"{names[i]}>{float(v):g}" for i in num for v in t)
    return [dataclasses.replace(p, X_train=enc(p.X_train), X_test=enc(p.X_test), feature_names=names + extra)
            for p in parts]


def load_parts(cfg, heads: tuple[str, ...], split_key: bytes):
    from clients.node import load_partner
    from simulations.partners import load_partner as loader

    return [load_partner(cfg, node_config={"partition-id": i, "num-partitions": cfg.partners}, loader=loader,
                         heads_key=",".join(heads), split_key=split_key) for i in range(cfg.partners)]


def replay_federation(cfg, parts, *, server_momentum: float = 0.0, server_lr: float = 1.0,
                      tail: float = 0.0) -> dict[str, Any]:
    """FedAvg over ``parts`` with each partner's DP-SGD rounds, in process. Returns the final model, the round-1
    model and the pooled mean training loss after every round (driver-side divergence check)."""
    import torch

    from clients.node import initial_privacy_state, train_round
    from clients.training import mean_loss
    from federation.models import build_model
    from server.optimizers import ServerOptimizer

    opt = ServerOptimizer(rounds=cfg.rounds, momentum=server_momentum, lr=server_lr, tail=tail)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, n_features=parts[0].X_train.shape[1], n_outputs=len(parts[0].heads))
    states = {p.partition_id: initial_privacy_state(cfg, p) if cfg.privacy.enabled else None for p in parts}
    X = torch.cat([p.X_train for p in parts])
    Y = torch.cat([p.Y_train for p in parts])
    losses, first = [mean_loss(model, X, Y)], None
    for rnd in range(1, cfg.rounds + 1):
        global_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        updates, weights = [], []
        for p in parts:
            st = states[p.partition_id]
            if st is not None:
                st.check_next_round()
            sd, metrics, states[p.partition_id] = train_round(cfg, p, global_sd, st, server_round=rnd)
            updates.append(sd)
            weights.append(float(metrics["num-examples"]))
        total = sum(weights)
        model.load_state_dict(opt.step(global_sd, {k: sum(w * u[k] for w, u in zip(weights, updates)) / total
                                                   for k in global_sd}))
        losses.append(mean_loss(model, X, Y))
        if rnd == 1:
            first = build_model(cfg.model, n_features=X.shape[1], n_outputs=Y.shape[1])
            first.load_state_dict(model.state_dict())
    model.load_state_dict(opt.released())
    losses[-1] = mean_loss(model, X, Y)  # the released model's loss
    sigmas = {p.partition_id: (states[p.partition_id].noise_multiplier if states[p.partition_id] else 0.0,
                               states[p.partition_id].sample_rate if states[p.partition_id] else 1.0,
                               states[p.partition_id].steps_per_round if states[p.partition_id] else 0)
              for p in parts}
    return {"model": model, "round1": first, "train_loss": losses, "dp": sigmas, "states": states,
            "epsilon": {p.partition_id: states[p.partition_id].epsilon() if states[p.partition_id] else None
                        for p in parts}}


def evaluate_dataset(data: str, eps: float, extra: list[str], *, personalise: bool = True,
                     server: dict[str, float] | None = None, thermometer_bins: int = 0,
                     split_key: bytes | None = None) -> dict[str, Any]:
    """One dataset x epsilon. ``split_key``: the keyed-hash train/test split (default: a fresh secret one per call;
    a fixed public key repeats the same split across calls, e.g. to compare settings on the same customers)."""
    from federation import metrics as M
    from federation.models import federations
    from simulations.baselines import head_metrics, pooled_metrics, run_baselines

    cfg = compose([f"data={data}", f"privacy.epsilon={eps}", "privacy.noise=fast", *extra])
    heads = federations(cfg.task, cfg.model.heads)[0]
    parts = load_parts(cfg, heads, split_key if split_key is not None else secrets.token_bytes(32))
    if thermometer_bins:
        parts = thermometer(parts, thermometer_bins)
    t0 = time.perf_counter()
    fed = replay_federation(cfg, parts, **(server or {}))
    t_fed = time.perf_counter() - t0
    model = fed["model"]
    base = run_baselines(cfg, parts, global_model=model, personalise_models=personalise)
    out: dict[str, Any] = {"data": data, "epsilon": eps, "partners": len(parts), "federation_s": t_fed,
                           "train_loss": fed["train_loss"], "dp": fed["dp"], "heads": {}}
    fed_pool = pooled_metrics(model, parts)
    calibrated = platt_calibrated(cfg, parts, model, fed["states"]) if cfg.privacy.enabled else None
    cal_pool = pooled_metrics(calibrated[0], parts) if calibrated else None
    fed_pp = {str(p.partition_id): head_metrics(model, p) for p in parts}
    for head in heads:
        c = base["centralized"]["pooled"][head]["auc_roc"]
        f = fed_pool[head]["auc_roc"]
        rows = []
        for p in parts:
            pid = str(p.partition_id)
            lo = base["local_only"]["per_partner"][pid][head]["auc_roc"]
            fd = fed_pp[pid][head]["auc_roc"]
            pers = (base.get("personalised", {}).get("per_partner", {}).get(pid) or {}).get(head, {}).get("auc_roc")
            paired = base["local_only"].get("paired_auc", {}).get(pid, {}).get(head, {})
            # +1 / -1: significantly better / worse than local-only (95% paired DeLong, same test customers); 0: noise
            sig = {k: (paired.get(f"{name}_vs_local_only") or {}).get("direction")
                   for k, name in (("fed_sig", "federated_dp"), ("pers_sig", "personalised"))}
            rows.append({"partner": pid, "n_train": p.n_train, "local": lo, "fed": fd, "personalised": pers, **sig,
                         "choice": (base.get("personalised", {}).get("model", {}).get(pid) or {}).get(head, ""),
                         "central": base["centralized"]["per_partner"][pid][head]["auc_roc"]})
        n = len(rows)
        out["heads"][head] = {
            "fed_auc": f, "central_auc": c, "central_model": (base["centralized"].get("model") or {}).get(head),
            "ratio": f / c, "ece": fed_pool[head]["ece"],
            "ece_platt": cal_pool[head]["ece"] if cal_pool else None,
            "ece_personalised": (base["personalised"]["pooled"][head]["ece"] if personalise else None),
            "platt": calibrated[1][head] if calibrated else None,
            "fed_beats_local": sum(r["fed"] > r["local"] for r in rows) / n,
            "pers_beats_local": (sum(r["personalised"] > r["local"] for r in rows if r["personalised"] is not None) / n
                                 if personalise else None),
            # no worse than local-only by more than 0.005 AUC (a tie with a partner whose local AUC is ~1 counts here)
            "pers_no_loss": (sum(r["personalised"] >= r["local"] - 0.005 for r in rows if r["personalised"] is not None)
                             / n if personalise else None),
            "per_partner": rows,
        }
    out["diverged"] = out["train_loss"][-1] > out["train_loss"][1] + 1e-6
    return out


def platt_calibrated(cfg, parts, model, states):
    """The released model after federated Platt scaling from the partners' DP evaluation releases of it
    (``clients.node.evaluate``: the same noisy counts, summed as the server does). Returns (model, per-head a/b).
    The fit uses the evaluation (test) customers' noisy counts, so the ECE after it is in-sample for 2 parameters."""
    import copy

    from clients.node import evaluate
    from federation import metrics as M
    from federation.calibration import calibrate_last_linear, platt_from_release

    sd = model.state_dict()
    releases = [evaluate(cfg, p, sd, states[p.partition_id])[0] for p in parts]
    out, per_head = copy.deepcopy(model), {}
    for j, head in enumerate(parts[0].heads):
        scaling = platt_from_release(M.combine_releases(releases, prefix=f"{head}.hist."))
        calibrate_last_linear(out, j, scaling)
        per_head[head] = scaling.as_dict()
    return out, per_head


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| data | epsilon | head | fed-DP AUC | centralized AUC (model) | ratio | fed-DP > local-only | "
             "personalised > local-only (>= -0.005) | ECE fed-DP (after DP recalibration) | ECE personalised | train loss r1 -> final | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for head, h in r["heads"].items():
            cal = ("" if h.get("ece_platt") is None else f" ({h['ece_platt']:.3f} {h['platt']['kind']})"
                   if h["platt"]["applied"] else " (too noisy: not applied)")
            pers = "-" if h["pers_beats_local"] is None else f"{h['pers_beats_local']:.0%} ({h['pers_no_loss']:.0%})"
            lines.append(
                f"| {r['data']} | {r['epsilon']:g} | {head} | {h['fed_auc']:.3f} | {h['central_auc']:.3f} "
                f"({h['central_model']}) | {h['ratio']:.3f} | {h['fed_beats_local']:.0%} | {pers} | {h['ece']:.3f}{cal} | "
                f"{'-' if h.get('ece_personalised') is None else format(h['ece_personalised'], '.3f')} | "
                f"{r['train_loss'][1]:.3f} -> {r['train_loss'][-1]:.3f} | {'YES' if r['diverged'] else 'no'} |")
    every = [row for r in results for h in r["heads"].values() for row in h["per_partner"]]
    rows = [row for row in every if row["personalised"] is not None]
    text = ""
    if rows:
        better = sum(row["personalised"] > row["local"] for row in rows)
        worse = sum(row["personalised"] < row["local"] for row in rows)
        text = (f"personalised > local-only for {better} of {len(rows)} partner-runs ({better / len(rows):.0%}), "
                f"equal {len(rows) - better - worse}, worse {worse} (worst {min(r['personalised'] - r['local'] for r in rows):+.3f}, "
                f"mean {sum(r['personalised'] - r['local'] for r in rows) / len(rows):+.4f} AUC)")
    sig = []
    for key, name in (("pers_sig", "personalised"), ("fed_sig", "fed-DP")):
        tested = [row[key] for row in every if row.get(key) is not None]
        if tested:
            sig.append(f"{name} vs local-only {sum(d > 0 for d in tested)} significant wins / "
                       f"{sum(d < 0 for d in tested)} significant losses of {len(tested)}")
    if sig:
        text += ("; " if text else "") + ("significant at 95% (paired DeLong on each partner's own test customers; "
                                          "the rest are within the noise of its test set): " + ", ".join(sig))
    if text:
        lines += ["", "All runs: " + text]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="*", default=list(DATASETS))
    ap.add_argument("--eps", nargs="*", type=float, default=[1.0, 3.0])
    ap.add_argument("--set", action="append", default=[], help="a Hydra override, e.g. train.lr=0.5 (repeatable)")
    ap.add_argument("--no-personalise", action="store_true")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM beta (server/optimizers.py)")
    ap.add_argument("--server-lr", type=float, default=1.0, help="FedAvgM eta")
    ap.add_argument("--tail", type=float, default=0.0, help="release the mean of the last ceil(tail*rounds) models")
    ap.add_argument("--thermometer", type=int, default=0, metavar="BINS",
                    help="experiment: add x > i/BINS indicators of every numeric feature (public thresholds)")
    ap.add_argument("--per-partner", action="store_true", help="also print each partner's AUCs")
    ap.add_argument("--json", help="write all results to this file")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = []
    for data in a.data:
        for eps in a.eps:
            t0 = time.perf_counter()
            r = evaluate_dataset(data, eps, a.set, personalise=not a.no_personalise,
                                 server={"server_momentum": a.server_momentum, "server_lr": a.server_lr, "tail": a.tail},
                                 thermometer_bins=a.thermometer)
            results.append(r)
            print("\n".join(line for line in render([r]).splitlines()[2:] if line.startswith("| ")), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if a.per_partner:
                for head, h in r["heads"].items():
                    for row in h["per_partner"]:
                        print(f"    {head} partner {row['partner']} (n_train {row['n_train']}): local {row['local']:.3f} "
                              f"fed {row['fed']:.3f} pers {row['personalised'] or float('nan'):.3f} "
                              f"central {row['central']:.3f} [{row['choice']}] significant vs local (+1/-1/0): "
                              f"fed {row['fed_sig']} pers {row['pers_sig']}", flush=True)
    print()
    print(render(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
