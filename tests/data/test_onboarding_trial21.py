"""Exports a third onboarding trial brought (a latin-1 ';' table with '?' for missing, a label written ' Yes' /
'yes' / 'No ', zero-padded customer numbers under a German name, signup dates as text; an event log whose page
views carry no amount): what `fedprop data propose` drafts and `fedprop data check` says about them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from clients.data_cli import main as data_main
from tests.data.test_onboarding_trial import _propose


def _bank(tmp_path, n=300, seed=3, encoding="latin-1", missing="?"):
    rng = np.random.default_rng(seed)
    tenure = rng.integers(0, 120, n).astype(object)
    tenure[rng.choice(n, 6, replace=False)] = missing
    renewed = rng.random(n) < 0.7
    frame = pd.DataFrame({
        "KundenNr": [f"{i:06d}" for i in rng.permutation(n) + 1],
        "Branch": rng.choice(["Zürich", "Genève", "Bern"], n),
        "Tenure_Months": tenure,
        "SignupDate": (pd.Timestamp("2015-01-01") + pd.to_timedelta(rng.integers(0, 2900, n), unit="D")).strftime("%m/%d/%Y"),
        "Renewed": np.where(renewed, rng.choice([" Yes", "yes", "YES "], n), rng.choice(["No ", "no"], n)),
    })
    path = tmp_path / "customers.csv"
    frame.to_csv(path, sep=";", index=False, encoding=encoding)
    return path


def test_a_latin1_export_is_drafted_with_encoding_and_the_error_names_the_flag(tmp_path, capsys):
    # before: "set source.encoding in the contract" while drafting the contract, and propose had no way to say it
    path = _bank(tmp_path)
    rc, _, _, err = _propose(tmp_path, path, "--label", "Renewed", capsys=capsys)
    assert rc == 1 and "--encoding" in err and "in the contract" not in err
    assert "Zürich" not in err and "Gen" not in err
    rc, draft, _, err = _propose(tmp_path, path, "--label", "Renewed", "--encoding", "latin-1", capsys=capsys)
    assert rc == 0, err
    assert draft["source"]["encoding"] == "latin-1"
    branch = next(f for f in draft["features"] if f["column"] == "Branch")
    assert set(branch["vocabulary"]) == {"Zürich", "Genève", "Bern"}


def test_label_spellings_that_differ_in_case_and_spaces_are_one_class_each(tmp_path, capsys):
    # before: "label column 'Renewed' has 5 distinct values; a label needs exactly 2" and no draft at all
    path = _bank(tmp_path, encoding="utf-8", missing="")
    rc, draft, contract, err = _propose(tmp_path, path, "--label", "Renewed", "--id", "KundenNr", capsys=capsys)
    assert rc == 0, err
    assert draft["label"]["positive"] == ["YES", "Yes", "yes"] and draft["label"]["negative"] == ["No", "no"]
    assert "5 spellings" in err
    assert data_main(["data", "check", str(contract)]) == 0, capsys.readouterr().err
    frame = pd.read_csv(path, sep=";", dtype=str)
    frame["Renewed"] = np.where(np.arange(len(frame)) % 3 == 0, "maybe", frame["Renewed"])
    frame.to_csv(path, sep=";", index=False)
    rc, _, _, err = _propose(tmp_path, path, "--label", "Renewed", capsys=capsys)
    assert rc == 2 and "3 distinct values (ignoring case" in err


def test_zero_padded_ids_and_text_dates_are_not_drafted_as_features(tmp_path, capsys):
    # before: KundenNr became a numeric feature (lo 1, hi 300, log1p) and SignupDate a 20-day categorical
    path = _bank(tmp_path, encoding="utf-8", missing="")
    rc, draft, _, err = _propose(tmp_path, path, "--label", "Renewed", capsys=capsys)
    assert rc == 0, err
    assert {f["column"] for f in draft["features"]} == {"Branch", "Tenure_Months"}
    assert "'KundenNr' left out of the features: unique per row and written with leading zeros" in err
    assert "'SignupDate' left out of the features: it holds dates" in err
    assert "--id COLUMN" in err  # and the no-id note lists it as a possible customer id


def test_a_parquet_date_column_is_not_a_feature(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 200
    frame = pd.DataFrame({"Tenure": rng.integers(0, 60, n), "Signup": pd.Timestamp("2020-01-01")
                          + pd.to_timedelta(rng.integers(0, 900, n), unit="D"),
                          "Churn": rng.choice(["Yes", "No"], n)})
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    rc, draft, _, err = _propose(tmp_path, tmp_path / "t.parquet", capsys=capsys)
    assert rc == 0, err
    assert [f["column"] for f in draft["features"]] == ["Tenure"] and "'Signup' left out" in err


def test_a_missing_marker_in_a_numeric_column_is_said_by_propose_and_check(tmp_path, capsys):
    path = _bank(tmp_path, encoding="utf-8", missing="?")
    rc, draft, contract, err = _propose(tmp_path, path, "--label", "Renewed", "--id", "KundenNr", capsys=capsys)
    assert rc == 0, err
    assert "'Tenure_Months' drafted as numeric, but 6 of its values are not numbers" in err
    assert data_main(["data", "check", str(contract)]) == 1
    err = capsys.readouterr().err
    assert "not numbers" in err and "left blank in the export" in err
    assert "'?'" in err  # the advice names the marker kind; no cell is quoted (every '?' cell is a marker)


EVENTS = """name: shop
kind: events
columns: {customer_id: cid, timestamp: ts, event_type: type, amount: [amount]}
events: {activity: [page_view, purchase], purchase: [purchase], cutoff: "2024-03-01", horizon_days: 30,
         lookback_days: 120}
min_customers: 3
"""


def _views_without_amounts(tmp_path, fmt):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(12):
        for d in rng.integers(-100, 30, 8):
            t = pd.Timestamp("2024-03-01") + pd.Timedelta(days=int(d), hours=int(rng.integers(0, 24)))
            buy = rng.random() < 0.3
            rows.append((f"c{i:02d}", t, "purchase" if buy else "page_view", f"{rng.gamma(2, 30):.2f}" if buy else ""))
    ev = pd.DataFrame(rows, columns=["cid", "ts", "type", "amount"])
    path = tmp_path / f"log.{fmt}"
    (ev.to_parquet(path, index=False) if fmt == "parquet" else ev.to_csv(path, index=False))
    return ev, path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_page_views_without_an_amount_pass_and_a_purchase_without_one_is_refused(tmp_path, fmt):
    """Before: every page view with a blank amount was 'missing (NaN)', with the advice to drop the rows, which
    would have changed the churn labels. Only purchases' amounts are summed; both engines say the same."""
    from federation.contract import load_contract
    from federation.engine_duckdb import read_event_features
    from federation.errors import DataValidationError
    from federation.validation import read_validated

    (tmp_path / "c.yaml").write_text(EVENTS)
    c = load_contract(str(tmp_path / "c.yaml"))
    ev, path = _views_without_amounts(tmp_path, fmt)
    v = read_validated(c, str(path), now="2026-01-01")
    res = read_event_features(c, str(path), now="2026-01-01")
    assert v.report == res.report
    buys = ev.index[ev["type"] == "purchase"][:2]
    ev.loc[buys, "amount"] = ""
    (ev.to_parquet(path, index=False) if fmt == "parquet" else ev.to_csv(path, index=False))
    for read in (read_validated, read_event_features):
        with pytest.raises(DataValidationError) as e:
            read(c, str(path), now="2026-01-01")
        assert [(p.code, p.count) for p in e.value.problems] == [("missing_value", 2)]
        assert "2 row(s) are purchases without an amount" in str(e.value)


@pytest.mark.parametrize("unit,fmt", [("s", "csv"), ("ms", "csv"), ("s", "parquet")])
def test_unix_time_event_logs_are_drafted_checked_and_featured_like_iso_ones(tmp_path, capsys, unit, fmt):
    """An 'event_ts' column of Unix epoch seconds (trial 21): propose could not find the time column, then said
    'set columns.timestamp_format (a strptime format)', which cannot read epochs. Now propose drafts
    timestamp_format epoch_s / epoch_ms with the cutoff from the log's end, check passes, and the features equal
    those of the same log written as ISO 8601 text; a row that is not a number is one clear problem."""
    import yaml

    from federation.contract import build_features, load_contract
    from federation.engine_duckdb import read_event_features
    from federation.errors import DataValidationError
    from federation.validation import read_validated

    ev, iso_path = _views_without_amounts(tmp_path, "csv")
    scale = 1 if unit == "s" else 1000
    epoch = ev["ts"].astype("datetime64[s]").astype("int64") * scale
    ev2 = ev.rename(columns={"ts": "event_ts"}).assign(event_ts=epoch if fmt == "parquet" else epoch.astype(str))
    path = tmp_path / f"epoch.{fmt}"
    (ev2.to_parquet(path, index=False) if fmt == "parquet" else ev2.to_csv(path, index=False))
    rc, draft, contract, err = _propose(tmp_path, path, "--kind", "events", "--id", "cid", capsys=capsys)
    assert rc == 0, err
    assert draft["columns"]["timestamp"] == "event_ts" and draft["columns"]["timestamp_format"] == f"epoch_{unit}"
    assert f"timestamp_format epoch_{unit}" in err and "UserWarning" not in err
    assert draft["events"]["cutoff"] == str((ev["ts"].max().floor("D") - pd.Timedelta(days=90)).date())
    (tmp_path / "c.yaml").write_text(EVENTS)
    iso = load_contract(str(tmp_path / "c.yaml"))
    d = yaml.safe_load(EVENTS)
    d["columns"].update(timestamp="event_ts", timestamp_format=f"epoch_{unit}")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(d))
    c = load_contract(str(tmp_path / "e.yaml"))
    want = build_features(read_validated(iso, str(iso_path), now="2026-01-01").frame, iso)
    got = read_event_features(c, str(path), now="2026-01-01")
    assert got.engine.startswith("pandas (fallback: Unix-time")
    assert np.array_equal(got.features.X, want.X) and list(got.features.customer_ids) == list(want.customer_ids)
    assert all(np.array_equal(got.features.y[k], want.y[k]) for k in want.y)
    if fmt == "csv":
        bad = ev2.assign(event_ts=ev2["event_ts"].astype(str))
        bad.loc[3, "event_ts"] = "2024-02-01"
        bad.to_csv(path, index=False)
        with pytest.raises(DataValidationError) as e:
            read_validated(c, str(path), now="2026-01-01")
        assert [p.code for p in e.value.problems] == ["bad_timestamp"]
        assert f"epoch_{unit} reads numbers of" in str(e.value) and "2024-02-01" not in str(e.value)


def test_stray_late_rows_do_not_move_the_drafted_cutoff():
    """Trial 21: 30 rows dated weeks after an export's bulk put the drafted cutoff past the data (churn 0.83). The
    log's end is now the last day of its bulk; a sparse day right after it (a partial last day) still counts."""
    import pandas as pd

    from clients.data_cli import log_end

    days = pd.date_range("2024-01-01", "2024-06-30", freq="D")
    per_day = pd.Series(500, index=days)
    per_day.iloc[-1] = 12  # the export ran at 00:30 on its last day: part of the bulk
    strays = pd.Series([3, 1, 2], index=pd.to_datetime(["2024-07-20", "2024-08-02", "2024-09-15"]))
    end, n = log_end(pd.concat([per_day, strays]).sort_index())
    assert end == pd.Timestamp("2024-06-30") and n == 6
    assert log_end(per_day) == (pd.Timestamp("2024-06-30"), 0)
    sparse = pd.Series(1, index=pd.to_datetime(["2024-01-01", "2024-02-11", "2024-05-03"]))  # a small, sparse log
    assert log_end(sparse) == (pd.Timestamp("2024-05-03"), 0)


def test_propose_names_the_strays_it_ignored(tmp_path, capsys):
    import numpy as np
    import pandas as pd
    import yaml

    from clients.data_cli import main as data_main

    rng = np.random.default_rng(0)
    t = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 180 * 86400, 20_000), unit="s")
    late = pd.to_datetime(["2024-09-01 10:00", "2024-10-15 08:00"])
    frame = pd.DataFrame({"customer_id": rng.integers(0, 800, 20_002),
                          "timestamp": [x.isoformat() for x in list(t) + list(late)],
                          "event_type": "purchase", "amount": 10.0})
    path = tmp_path / "log.csv"
    frame.to_csv(path, index=False)
    rc = data_main(["data", "propose", str(path), "--kind", "events"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    draft = yaml.safe_load(out)
    assert draft["events"]["cutoff"] == str((t.max().floor("D") - pd.Timedelta(days=90)).date())
    assert "2 event(s) dated after" in err
