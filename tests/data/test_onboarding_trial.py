"""What a first-time user hit onboarding exports that differ from the bundled datasets (a ';'- or tab-separated
CSV, an id column named 'Client Ref', a 'churned'/'stayed' label, day-first timestamps, an order log with product
columns and no event type): `fedprop data propose` drafts what it can and says what it cannot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clients.data_cli import main as data_main


def _propose(tmp_path, path, *args, capsys):
    rc = data_main(["data", "propose", str(path), *args])
    out = capsys.readouterr()
    contract = tmp_path / "contract.yaml"
    contract.write_text(out.out)
    return rc, (yaml.safe_load(out.out) if rc == 0 else None), contract, out.err


def _table(tmp_path, *, sep=";", n=400, seed=0, id_name="Client Ref", label_name="Status"):
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, n)
    churned = rng.random(n) < 1 / (1 + np.exp(0.05 * tenure))
    frame = pd.DataFrame({id_name: [f"CL-{i:05d}" for i in rng.permutation(n)],
                          "Branch Region": rng.choice(["North", "South"], n), "Tenure Months": tenure,
                          label_name: np.where(churned, "churned", "stayed")})
    path = tmp_path / "customers.csv"
    frame.to_csv(path, index=False, sep=sep)
    return path


def test_a_semicolon_separated_table_is_drafted_with_its_separator(tmp_path, capsys):
    # before: every header name was one column, and the error said "two-valued columns: none"
    path = _table(tmp_path, sep=";")
    rc, draft, contract, err = _propose(tmp_path, path, "--label", "Status", "--id", "Client Ref", capsys=capsys)
    assert rc == 0, err
    assert draft["source"]["sep"] == ";" and "separated by ';'" in err
    assert {f["column"] for f in draft["features"]} == {"Branch Region", "Tenure Months"}
    assert data_main(["data", "check", str(contract)]) == 0, capsys.readouterr().err
    rc, _, _, err = _propose(tmp_path, path, "--sep", ",", "--label", "Status", capsys=capsys)
    assert rc == 2 and "separated by" not in err  # an explicit --sep is kept: the label is not a column then


def test_a_tab_separated_table_without_a_label_name_lists_its_real_columns(tmp_path, capsys):
    path = _table(tmp_path, sep="\t", label_name="Kept Or Not")
    rc, _, _, err = _propose(tmp_path, path, capsys=capsys)
    assert rc == 2 and "--label COLUMN" in err and "Kept Or Not" in err and "separated by '\\t'" in err


def test_common_export_names_are_inferred_without_flags(tmp_path, capsys):
    """'Status' (churned/stayed) as the label and 'Client Ref' / 'Subscriber Key' as the id: a first-time user
    had to pass --label and --id for names every CRM export uses."""
    for id_name in ("Client Ref", "Subscriber Key", "Customer Number"):
        path = _table(tmp_path, sep="\t", id_name=id_name)
        rc, draft, contract, err = _propose(tmp_path, path, capsys=capsys)
        assert rc == 0, err
        assert draft["columns"]["customer_id"] == id_name and draft["label"]["column"] == "Status"
        assert draft["label"]["task"] == "churn"
        rc = data_main(["data", "check", str(contract)])
        assert rc == 0, capsys.readouterr().err
        capsys.readouterr()


def test_an_id_column_with_an_unknown_name_is_pointed_out(tmp_path, capsys):
    path = _table(tmp_path, id_name="Ref Code")
    rc, draft, _, err = _propose(tmp_path, path, "--label", "Status", capsys=capsys)
    assert rc == 0 and draft["columns"]["customer_id"] == ""
    assert "no customer id column was inferred" in err and "'Ref Code'" in err and "--id COLUMN" in err


def test_a_label_whose_positive_value_says_churned_is_a_churn_task(tmp_path, capsys):
    path = _table(tmp_path)
    rc, draft, _, err = _propose(tmp_path, path, "--label", "Status", "--id", "Client Ref", capsys=capsys)
    assert rc == 0
    assert draft["label"]["positive"] == ["churned"] and draft["label"]["task"] == "churn"
    rc, draft, _, _ = _propose(tmp_path, path, "--label", "Status", "--task", "propensity", capsys=capsys)
    assert draft["label"]["task"] == "propensity"


def _orders(tmp_path, n_customers=150, seed=1):
    """An order log: day-first timestamps, no event type column, a product code per line, a country per customer."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_customers):
        country = rng.choice(["UK", "France", "Spain"])
        for k in range(int(rng.integers(2, 15))):
            t = pd.Timestamp("2023-01-01") + pd.Timedelta(minutes=int(rng.integers(0, 364 * 24 * 60)))
            rows.append({"Order No": ("C" if rng.random() < 0.05 else "") + str(500000 + len(rows)),
                         "Item Code": f"P{rng.integers(0, 400):04d}", "Qty": int(rng.integers(1, 10)),
                         "Order Time": t.strftime("%d/%m/%Y %H:%M"), "Unit Price GBP": float(rng.gamma(2, 2)),
                         "Client Number": 10000 + c, "Market": country})
    frame = pd.DataFrame(rows)
    path = tmp_path / "orders.csv"
    frame.to_csv(path, index=False, sep=";")
    last = pd.to_datetime(frame["Order Time"], format="%d/%m/%Y %H:%M").max()
    return path, last


def test_an_order_log_with_day_first_timestamps_gets_their_format_and_a_cutoff_inside_the_log(tmp_path, capsys):
    path, last = _orders(tmp_path)
    rc, draft, contract, err = _propose(tmp_path, path, "--kind", "events", "--id", "Client Number",
                                        "--timestamp", "Order Time", capsys=capsys)
    assert rc == 0, err
    assert draft["columns"]["timestamp_format"] == "%d/%m/%Y %H:%M"
    # before: dateutil read 01/12 as January 12th, and the cutoff came out months off
    assert draft["events"]["cutoff"] == str((last - pd.Timedelta(days=90)).date())
    # a product code is the product column (before: a static attribute candidate, then left out); the country is one
    assert [s["column"] for s in draft["static"]] == ["Market"] and draft["columns"]["product"] == "Item Code"
    # quantity x unit price is the line value, the order number the transaction (before: "no amount column")
    assert draft["columns"]["amount"] == ["Qty", "Unit Price GBP"] and draft["columns"]["transaction"] == "Order No"
    assert draft["events"]["purchase"] == ["purchase"]  # (was [] without an event type column)
    assert "no event type column" in err and "event_type_rule: prefix" in err and "no amount column" not in err
    assert "data.cutoff" in err
    # the note's recipe makes it pass the check
    draft["columns"].update(event_type="Order No", amount=["Qty", "Unit Price GBP"])
    draft["events"].update(event_type_rule="prefix", event_type_map={"C": "return"}, event_type_default="purchase",
                           activity=["purchase"], purchase=["purchase"], returns=["return"])
    contract.write_text(yaml.safe_dump(draft, sort_keys=False))
    assert data_main(["data", "check", str(contract)]) == 0, capsys.readouterr().err


def test_the_cutoff_of_a_log_longer_than_rows_comes_from_its_last_event(tmp_path, capsys):
    path, last = _orders(tmp_path)
    frame = pd.read_csv(path, sep=";")
    frame["t"] = pd.to_datetime(frame["Order Time"], format="%d/%m/%Y %H:%M")
    frame.sort_values("t").drop(columns="t").to_csv(path, index=False, sep=";")  # exports are in time order
    rc, draft, _, err = _propose(tmp_path, path, "--kind", "events", "--id", "Client Number", "--timestamp",
                                 "Order Time", "--rows", "100", capsys=capsys)
    assert rc == 0 and "first 100 rows only" in err
    assert draft["events"]["cutoff"] == str((last - pd.Timedelta(days=90)).date())


def test_an_event_log_without_an_inferable_id_lists_its_columns(tmp_path, capsys):
    path, _ = _orders(tmp_path)
    frame = pd.read_csv(path, sep=";").rename(columns={"Client Number": "Buyer"})
    frame.to_csv(path, index=False, sep=";")
    rc, _, _, err = _propose(tmp_path, path, "--kind", "events", capsys=capsys)
    assert rc == 2 and "--id COLUMN" in err and "Buyer" in err and "Order Time" in err


def test_an_order_log_gets_its_id_and_time_columns_from_their_names(tmp_path, capsys):
    """'Client Number' and 'Order Time' are inferred (a first-time user had to name both with flags); a column
    whose name ends in 'time' but whose values are not dates is not taken as the event time."""
    path, _ = _orders(tmp_path)
    frame = pd.read_csv(path, sep=";")
    frame.insert(0, "Lifetime", 3)  # a name ending in 'time', values not dates: skipped
    frame.to_csv(path, index=False, sep=";")
    rc, draft, _, err = _propose(tmp_path, path, "--kind", "events", capsys=capsys)
    assert rc == 0, err
    assert draft["columns"]["customer_id"] == "Client Number" and draft["columns"]["timestamp"] == "Order Time"


def test_an_event_log_simulation_uses_the_contracts_cutoff_unless_data_cutoff_is_set(tmp_path):
    """A user ran `fedprop simulate data.kind=events data.contract=...` on a 2011 log after `data check` passed, and
    it failed with 'no events in the label horizon [2024-01-01, ...)': the synthetic demo's dates overrode the
    contract's. Now the contract's dates hold unless data.cutoff / data.horizon_days are given."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from federation.config import from_dict
    from simulations.realdata import contract_for
    from simulations.simulate import _register_schema

    ROOT = Path(__file__).resolve().parents[2]
    c = yaml.safe_load((ROOT / "conf" / "contracts" / "online_retail.yaml").read_text())
    c["source"]["files"] = [str(ROOT / "conf" / "contracts" / "online_retail.yaml")]  # any path: not read here
    (tmp_path / "shop.yaml").write_text(yaml.safe_dump(c))

    def data_cfg(*extra):
        _register_schema()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["data.kind=events", "data.name=shop",
                                                           f"data.contract={tmp_path / 'shop.yaml'}", *extra])
        return from_dict(OmegaConf.to_container(cfg, resolve=True)).data

    assert (contract_for(data_cfg()).events.cutoff, contract_for(data_cfg()).events.horizon_days) == ("2011-09-10", 91)
    moved = contract_for(data_cfg("data.cutoff=2011-06-01", "data.horizon_days=60"))
    assert (moved.events.cutoff, moved.events.horizon_days) == ("2011-06-01", 60)


def test_unparseable_timestamps_are_reported_before_their_consequences(tmp_path):
    """A wrong timestamp_format made 'no events in the label horizon' and 'only 0 customers' come first and the
    cause (the rows that do not parse) last; the cause is now read first."""
    from federation.contract import load_contract
    from federation.errors import DataValidationError
    from federation.validation import read_validated

    path, _ = _orders(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "name": "orders", "kind": "events", "source": {"files": [str(path)], "sep": ";"},
        "columns": {"customer_id": "Client Number", "timestamp": "Order Time", "timestamp_format": "%Y-%m-%d %H:%M",
                    "event_type": "Order No", "amount": ["Qty", "Unit Price GBP"]},
        "events": {"cutoff": "2023-10-01", "horizon_days": 60, "lookback_days": 365, "event_type_rule": "prefix",
                   "event_type_map": {"C": "return"}, "event_type_default": "purchase", "activity": ["purchase"],
                   "purchase": ["purchase"]}}))
    with pytest.raises(DataValidationError) as e:
        read_validated(load_contract(str(tmp_path / "c.yaml")))
    codes = [p.code for p in e.value.problems]
    assert "too_few_customers" in codes and len(codes) >= 2
    assert "timestamp" in codes[0] or "cannot be parsed as timestamps" in str(e.value.problems[0])


def test_decimal_commas_are_drafted_checked_and_read_as_numbers(tmp_path, capsys):
    """A ';'-separated export with decimal commas (12,5): propose drafted the fee as a categorical of price strings
    and silently dropped a score column, and data check passed (a second onboarding trial). Now the draft sets
    source.decimal ',' and both columns are numeric; check reads 12,5 as 12.5; a dotted value ('1.234,5': a
    thousands separator) is refused by row, and a free-text column left out is said."""
    from federation.contract import build_features, load_contract
    from federation.validation import read_validated

    rng = np.random.default_rng(1)
    n = 300
    fee = np.round(rng.uniform(18, 120, n), 2)
    frame = pd.DataFrame({"Client Ref": [f"CL-{i:05d}" for i in range(n)],
                          "Monthly Fee": [f"{v:.2f}".replace(".", ",") for v in fee],
                          "Value Score": [f"{v:.3f}".replace(".", ",") for v in rng.uniform(0, 1, n)],
                          "Remarks": [f"called on day {i} about tariff {rng.integers(1e6)}" for i in range(n)],
                          "Cancelled": np.where(rng.random(n) < 1 / (1 + np.exp(-(fee - 70) / 10)), "1", "0")})
    path = tmp_path / "eu.csv"
    frame.to_csv(path, index=False, sep=";")
    rc, draft, contract, err = _propose(tmp_path, path, "--label", "Cancelled", capsys=capsys)
    assert rc == 0, err
    assert draft["source"]["decimal"] == "," and "decimal comma" in err
    kinds = {f["column"]: f["kind"] for f in draft["features"]}
    assert kinds == {"Monthly Fee": "numeric", "Value Score": "numeric"}, kinds
    assert "column 'Remarks' left out of the features" in err
    assert data_main(["data", "check", str(contract)]) == 0, capsys.readouterr().err
    c = load_contract(str(contract))
    v = read_validated(c)
    assert np.allclose(v.frame["Monthly Fee"].to_numpy(), fee)
    fs = build_features(v.frame, c)
    assert fs.X.shape == (n, len(c.feature_names()))
    bad = frame.copy()
    bad.loc[7, "Monthly Fee"] = "1.234,50"
    bad.to_csv(path, index=False, sep=";")
    capsys.readouterr()
    assert data_main(["data", "check", str(contract)]) != 0
    assert "'Monthly Fee': 1 row(s) are not numbers" in capsys.readouterr().err


def test_a_filled_blank_is_said(tmp_path):
    """A numeric feature with fill: its blanks were filled without a word (the trial's 11 blank 'Total Billed')."""
    from federation.contract import contract_from_dict
    from federation.validation import read_validated

    path = tmp_path / "t.csv"
    pd.DataFrame({"x": ["1", "", "3", " ", "5", "6"], "y": ["0", "1", "0", "1", "0", "1"]}).to_csv(path, index=False)
    c = contract_from_dict({"name": "t", "kind": "table", "source": {"files": [str(path)]},
                            "columns": {"label": "y"}, "label": {"column": "y", "positive": ["1"], "negative": ["0"]},
                            "features": [{"column": "x", "kind": "numeric", "lo": 0, "hi": 10, "fill": 0}],
                            "min_customers": 2})
    notes = read_validated(c).report.notes
    assert "2 missing value(s) of column 'x' filled with the contract's fill: 0" in notes, notes


def test_an_iso_parquet_log_gets_no_format_note_and_a_purchase_only_log_is_told_its_two_labels_are_one(tmp_path,
                                                                                                    capsys):
    """An event-log trial: propose said an ISO timestamp column 'is not ISO 8601' for every Parquet file, and a log
    whose activity is only purchases trained churn and propensity on one label without a word."""
    rng = np.random.default_rng(2)
    n = 3000
    when = pd.Timestamp("2011-01-01") + pd.to_timedelta(rng.integers(0, 360 * 86400, n), unit="s")
    log = pd.DataFrame({"Member": rng.integers(0, 300, n).astype(str), "When": when.astype(str),
                        "event_type": "purchase", "amount": rng.uniform(1, 50, n).round(2)})
    path = tmp_path / "orders.parquet"
    log.to_parquet(path, index=False)
    rc, draft, contract, err = _propose(tmp_path, path, "--kind", "events", "--id", "Member", "--timestamp", "When",
                                        capsys=capsys)
    assert rc == 0, err
    assert "is not ISO 8601" not in err and not draft["columns"].get("timestamp_format")
    assert data_main(["data", "check", str(contract)]) == 0
    assert "churn (no activity in the horizon) is exactly 'no purchase'" in capsys.readouterr().out


def test_events_propose_names_every_missing_column_at_once(tmp_path, capsys):
    """An event-log trial had to rerun propose once per missing flag (--id, then --timestamp)."""
    log = pd.DataFrame({"Member": ["a", "b"] * 50, "Stamp": ["x"] * 100, "Qty": [1] * 100})
    path = tmp_path / "log.csv"
    log.to_csv(path, index=False)
    rc, _, _, err = _propose(tmp_path, path, "--kind", "events", capsys=capsys)
    assert rc == 2 and "--id COLUMN" in err and "--timestamp COLUMN" in err and "Member, Stamp, Qty" in err
