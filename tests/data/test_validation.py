"""Validation on corrupted copies of the real files (written to tmp_path); inputs are never modified."""
from __future__ import annotations

import gzip
import sqlite3

import numpy as np
import pandas as pd
import pytest

from clients.data_cli import main as data_main
from federation.contract import load_contract
from federation.errors import DataValidationError
from federation.readers import open_source, read_frame
from federation.validation import read_validated
from tests.data.conftest import sha256

TELCO = "telco_churn/WA_Fn-UseC_-Telco-Customer-Churn.csv"
IRAN = "iranian_churn/Customer_Churn.csv"


def _problems(contract, path, **kw) -> list[str]:
    before = sha256(path)
    with pytest.raises(DataValidationError) as e:
        read_validated(contract, str(path), **kw)
    assert sha256(path) == before, "validation modified its input"
    return e.value.problems


def _telco(shared_data, tmp_path, mutate, name="telco.csv"):
    df = pd.read_csv(shared_data / TELCO, dtype=str, keep_default_na=False)
    df = mutate(df)
    out = tmp_path / name
    df.to_csv(out, index=False)
    return out


def test_clean_files_validate_and_are_untouched(shared_data):
    for name, rel in [("telco_churn", TELCO), ("iranian_churn", IRAN)]:
        before = sha256(shared_data / rel)
        v = read_validated(load_contract(f"contracts/{name}.yaml"))
        assert v.report.customers > 1000
        assert sha256(shared_data / rel) == before


def test_misspelled_column_suggests_nearest(shared_data, tmp_path):
    p = _telco(shared_data, tmp_path, lambda d: d.rename(columns={"MonthlyCharges": "MonthlyCharge", "tenure": "Tenure"}))
    probs = _problems(load_contract("contracts/telco_churn.yaml"), p)
    assert any("'MonthlyCharges'" in x and "did you mean 'MonthlyCharge'" in x for x in probs)
    assert any("'tenure'" in x and "did you mean 'Tenure'" in x for x in probs)
    assert len(probs) == 2


def test_all_row_problems_are_collected_with_examples(shared_data, tmp_path):
    def corrupt(d):
        d = d.copy()
        d.loc[[3, 7], "MonthlyCharges"] = "12,50 EUR"  # wrong dtype
        d.loc[[5], "tenure"] = ""  # NaN
        d.loc[[11], "tenure"] = "inf"
        d.loc[[4, 9], "Churn"] = "Maybe"  # non-binary
        d.loc[[20], "customerID"] = d.loc[21, "customerID"]  # duplicate id
        return d

    probs = _problems(load_contract("contracts/telco_churn.yaml"), _telco(shared_data, tmp_path, corrupt))
    text = "\n".join(probs)
    assert "'MonthlyCharges': 2 row(s) are not numbers (wrong dtype) (lines 5, 9)" in text
    assert "'tenure': 1 row(s) are missing (NaN) (line 7)" in text
    assert "'tenure': 1 row(s) are infinite (line 13)" in text
    assert "'Churn': 2 row(s) have a label that is neither positive" in text and "(lines 6, 11)" in text
    assert "1 customer id(s) appear more than max_rows_per_customer=1 time(s) (repeats at line 23)" in text
    # row numbers, never values: no cell text and no customer id in any message
    assert "12,50" not in text and "Maybe" not in text and str(pd.read_csv(shared_data / TELCO).customerID[21]) not in text
    assert all("telco.csv" not in x for x in probs)  # the file is the error's source, named once
    assert len(probs) == 5


def test_no_positives_and_too_few_customers(shared_data, tmp_path):
    p = _telco(shared_data, tmp_path, lambda d: d.loc[d["Churn"] == "No"].head(50))
    text = "\n".join(_problems(load_contract("contracts/telco_churn.yaml"), p))
    assert "no positive rows" in text
    assert "only 50 customer(s)" in text and "delta must be well below 1/n" in text


def test_delta_above_one_over_n(shared_data):
    probs = _problems(load_contract("contracts/iranian_churn.yaml"), shared_data / IRAN, delta=1e-3)
    assert len(probs) == 1 and "not below 1/n" in probs[0]


def _retail(shared_data, tmp_path, mutate):
    with gzip.open(shared_data / "online_retail/online_retail.csv.gz", "rt") as f:
        df = pd.read_csv(f, dtype=str, keep_default_na=False, nrows=60_000)
    df = mutate(df)
    out = tmp_path / "retail.csv.gz"
    df.to_csv(out, index=False, compression="gzip")
    return out


def test_event_log_timestamps_and_amounts(shared_data, tmp_path):
    def corrupt(d):
        d = d.copy()
        d.loc[[2, 3], "InvoiceDate"] = "31/12/2010 10:00"  # unparseable for the declared format
        d.loc[[6], "InvoiceDate"] = "2031-01-01 00:00:00"  # future
        d.loc[[8], "UnitPrice"] = "-2.5"  # negative purchase amount
        d.loc[[10], "Quantity"] = "NaN"
        return d

    c = load_contract("contracts/online_retail.yaml").with_events(cutoff="2010-12-20", horizon_days=7)
    text = "\n".join(_problems(c, _retail(shared_data, tmp_path, corrupt), now="2026-01-01"))
    assert "'InvoiceDate': 2 row(s) cannot be parsed as timestamps (or are impossible dates) (lines 4, 5)" in text
    assert "'InvoiceDate': 1 row(s) are in the future (after 2026-01-01 00:00) (line 8)" in text
    assert "31/12/2010" not in text and "2031" not in text
    assert "'Quantity*UnitPrice': 1 row(s) are purchases with a negative amount" in text
    assert "'Quantity': 1 row(s) are purchases without an amount" in text


def test_cli_check_reports_once_without_traceback(shared_data, tmp_path, capsys):
    bad = _telco(shared_data, tmp_path, lambda d: d.rename(columns={"Churn": "churn"}))
    assert data_main(["data", "check", "contracts/telco_churn.yaml", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "did you mean 'churn'" in err and "Traceback" not in err
    garbage = tmp_path / "garbage.csv.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    assert data_main(["data", "check", "contracts/telco_churn.yaml", str(garbage)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    assert data_main(["data", "check", "contracts/telco_churn.yaml"]) == 0
    assert "OK:" in capsys.readouterr().out


# ---------------------------------------------------------------------------- readers
def test_readers_agree_csv_gzip_parquet_sqlite(tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "x": [1.5, 2.0, None], "y": ["1", "0", "1"], "unused": [9, 9, 9]})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_csv(tmp_path / "t.csv.gz", index=False, compression="gzip")
    df.to_parquet(tmp_path / "t.parquet")
    with sqlite3.connect(tmp_path / "t.db") as con:
        df.to_sql("t", con, index=False)
    before = {p: sha256(p) for p in tmp_path.iterdir()}
    frames = [read_frame(open_source(tmp_path / n, chunksize=2), ["id", "x"]) for n in ("t.csv", "t.csv.gz", "t.parquet")]
    sql = open_source(f"sqlite:///{tmp_path / 't.db'}", query="SELECT * FROM t", chunksize=2)
    assert sql.columns() == ["id", "x", "y", "unused"]
    frames.append(read_frame(sql, ["id", "x"]))
    for f in frames:
        assert list(f.columns) == ["id", "x"] and len(f) == 3
        assert list(f["id"].astype(str)) == ["a", "b", "c"]
        assert pd.to_numeric(f["x"]).iloc[:2].tolist() == [1.5, 2.0] and pd.isna(f["x"].iloc[2])
    assert {p: sha256(p) for p in tmp_path.iterdir()} == before
    with pytest.raises(DataValidationError, match="read-only SELECT"):
        open_source(f"sqlite:///{tmp_path / 't.db'}", query="DELETE FROM t").columns()


def test_validation_reads_parquet_and_sql_sources(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"cid": [f"c{i}" for i in range(300)], "v": rng.normal(size=300), "lab": rng.integers(0, 2, 300)})
    df.to_parquet(tmp_path / "t.parquet")
    with sqlite3.connect(tmp_path / "t.db") as con:
        df.to_sql("t", con, index=False)
    from federation.contract import contract_from_dict
    spec = {"name": "t", "kind": "table", "columns": {"customer_id": "cid", "label": "lab"},
            "label": {"column": "lab", "positive": [1], "negative": [0], "task": "propensity"},
            "features": [{"column": "v", "lo": -5, "hi": 5}]}
    v1 = read_validated(contract_from_dict(spec), str(tmp_path / "t.parquet"))
    sql = dict(spec, source={"format": "sql", "url": f"sqlite:///{tmp_path / 't.db'}", "query": "SELECT * FROM t"})
    v2 = read_validated(contract_from_dict(sql))
    assert v1.report.customers == v2.report.customers == 300
    assert np.allclose(v1.frame["v"], v2.frame["v"]) and (v1.frame["__label"] == v2.frame["__label"]).all()
