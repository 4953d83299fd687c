"""Onboarding a dataset the repo has never seen, from the docs alone: propose -> check -> simulate, with the
contract outside the repo, natural partners from a column, and refusal of degenerate splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from clients.data_cli import main as data_main
from federation.errors import DataValidationError
from simulations.realdata import load_partner_features, natural_partner_names, num_natural_partners


def _table(tmp_path, n=900, *, positives=None, seed=0):
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south", "east"], n, p=[0.5, 0.3, 0.2])
    tenure = rng.integers(1, 72, n)
    spend = rng.gamma(2.0, 40.0, n).round(2)
    p = 1 / (1 + np.exp(-(-1.0 - 0.04 * tenure + 0.01 * spend)))
    exited = np.where(rng.random(n) < p, "Yes", "No")
    if positives is not None:
        exited = np.array(["No"] * n, dtype=object)
        exited[:positives] = "Yes"
    frame = pd.DataFrame({"CustomerRef": [f"C{i:05d}" for i in range(n)], "Region": region, "TenureMonths": tenure,
                          "MonthlySpend": spend, "Exited": exited})
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False)
    return path


def _propose(tmp_path, path, *args, capsys):
    rc = data_main(["data", "propose", str(path), *args])
    out = capsys.readouterr()
    contract = tmp_path / "contract.yaml"
    contract.write_text(out.out)
    return rc, contract, out


def test_propose_infers_label_and_id_and_passes_check_from_another_folder(tmp_path, capsys, monkeypatch):
    path = _table(tmp_path)
    rc, contract, _ = _propose(tmp_path, path, "--id", "CustomerRef", capsys=capsys)
    assert rc == 0
    draft = yaml.safe_load(contract.read_text())
    assert draft["label"] == {"column": "Exited", "positive": ["Yes"], "negative": ["No"], "task": "churn"}
    assert draft["columns"]["customer_id"] == "CustomerRef"
    assert {f["column"] for f in draft["features"]} == {"Region", "TenureMonths", "MonthlySpend"}  # never label or id
    assert draft["source"]["files"] == [str(path.resolve())]
    monkeypatch.chdir(tmp_path.parent)  # the draft's data path does not depend on the working folder
    assert data_main(["data", "check", str(contract)]) == 0
    assert "OK:" in capsys.readouterr().out


def test_propose_without_a_recognisable_label_asks_for_one(tmp_path, capsys):
    path = _table(tmp_path)
    pd.read_csv(path).rename(columns={"Exited": "Flag"}).to_csv(path, index=False)
    rc, _, out = _propose(tmp_path, path, capsys=capsys)
    assert rc == 2 and "--label COLUMN" in out.err and "Flag" in out.err
    rc, contract, _ = _propose(tmp_path, path, "--label", "Flag", "--task", "propensity", capsys=capsys)
    assert rc == 0 and yaml.safe_load(contract.read_text())["label"]["task"] == "propensity"
    assert data_main(["data", "check", str(contract)]) == 0


def test_propose_drafts_an_event_log_contract_that_passes_check(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = []
    for c in range(150):
        for _ in range(rng.integers(1, 12)):
            day = pd.Timestamp("2024-01-01") + pd.Timedelta(days=int(rng.integers(0, 360)))
            rows.append({"customer_id": f"u{c}", "timestamp": day.strftime("%Y-%m-%d %H:%M:%S"),
                         "event_type": rng.choice(["visit", "purchase", "return"]),
                         "amount": float(rng.gamma(2, 20)), "segment": rng.choice(["a", "b"])})
    path = tmp_path / "events.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    rc, contract, _ = _propose(tmp_path, path, "--kind", "events", capsys=capsys)
    assert rc == 0
    draft = yaml.safe_load(contract.read_text())
    assert draft["kind"] == "events" and draft["columns"]["timestamp"] == "timestamp"
    assert draft["events"]["purchase"] == ["purchase"] and draft["events"]["returns"] == ["return"]
    assert [s["column"] for s in draft["static"]] == ["segment"]
    assert data_main(["data", "check", str(contract)]) == 0, capsys.readouterr().err


def test_natural_partners_from_a_column_of_a_contract_outside_the_repo(tmp_path, capsys):
    path = _table(tmp_path, n=1500)
    rc, contract, _ = _propose(tmp_path, path, capsys=capsys)
    data = {"name": "mine", "kind": "table", "contract": str(contract), "partitioner": "natural",
            "partition_by": "Region", "min_positives": 10}
    assert num_natural_partners(data) == 3 and natural_partner_names(data) == ["north", "south", "east"]
    sizes = [len(load_partner_features(data, partition_id=i, num_partitions=3, seed=0)) for i in range(3)]
    assert sum(sizes) == 1500 and sizes[0] > sizes[1] > sizes[2]
    with pytest.raises(Exception, match="partition_by='Nope'.*Region"):
        num_natural_partners({**data, "partition_by": "Nope"})
    with pytest.raises(Exception, match="data.partition_by=<column>"):
        num_natural_partners({**data, "partition_by": ""})


def test_a_split_leaving_a_partner_few_positives_is_refused(tmp_path, capsys):
    path = _table(tmp_path, n=1200, positives=12)
    rc, contract, _ = _propose(tmp_path, path, "--label", "Exited", capsys=capsys)
    data = {"name": "mine", "kind": "table", "contract": str(contract), "partitioner": "natural",
            "partition_by": "Region", "min_positives": 10}
    with pytest.raises(DataValidationError, match="too_few_positives|fewer than data.min_positives=10") as err:
        for i in range(3):
            load_partner_features(data, partition_id=i, num_partitions=3, seed=0)
    # a natural split's advice is about the partition column (dirichlet_alpha does nothing there)
    assert "data.partition_by" in str(err.value) and "dirichlet_alpha" not in str(err.value)
    fs = load_partner_features({**data, "min_positives": 0}, partition_id=2, num_partitions=3, seed=0)
    assert len(fs) > 0


def test_every_contract_example_in_the_onboarding_guide_loads(tmp_path):
    """The guide's examples are real contracts (load_contract validates every key): the docs cannot drift."""
    import re
    from pathlib import Path

    from federation.contract import load_contract

    text = (Path(__file__).resolve().parents[2] / "docs" / "onboarding.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if re.search(r"^kind: (table|events)$", b, re.M)]
    contracts = [b for b in blocks if "source:" in b]
    assert len(contracts) == 3  # table, events, sql
    for i, b in enumerate(contracts):
        (tmp_path / f"c{i}.yaml").write_text(b)
        assert load_contract(tmp_path / f"c{i}.yaml").kind in ("table", "events")
