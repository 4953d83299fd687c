"""Regenerate the malformed-file corpus: ``python tests/data/corpus/make_corpus.py`` (files are committed).

Each file breaks one rule the way real exports do; tests/data/test_corpus.py pins the first line of the
message each one gets. Values planted here (ids ``ZQ-SECRET-*``, cells ``SECRETVAL*``) must never appear
in any message.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
HEADER = ["cid", "age", "plan", "spend", "churned"]
PLANS = ["basic", "plus", "pro"]


def rows(n: int = 12) -> list[list[str]]:
    return [[f"ZQ-SECRET-{i:03d}", str(20 + i), PLANS[i % 3], f"{10.5 * i:.2f}", str(i % 2)] for i in range(n)]


def csv_text(header, body, sep=",") -> str:
    return "\n".join(sep.join(r) for r in [header, *body]) + "\n"


def table(name: str, mutate=None, sep=",", header=HEADER) -> None:
    body = rows()
    if mutate:
        body = mutate(body)
    (HERE / name).write_text(csv_text(header, body, sep))


def put(body, i, col, value):
    body[i][HEADER.index(col)] = value
    return body


def events_rows() -> list[list[str]]:
    out = []
    for c in range(6):
        out.append([f"ZQ-SECRET-{c:03d}", f"2023-11-{10 + c:02d} 10:00:00", "visit", "0"])
        out.append([f"ZQ-SECRET-{c:03d}", f"2023-12-{10 + c:02d} 12:00:00", "purchase", f"{5 + c}.50"])
        if c % 2:  # half the customers come back in the horizon
            out.append([f"ZQ-SECRET-{c:03d}", f"2024-01-{10 + c:02d} 09:00:00", "purchase", "7.25"])
    out.append(["ZQ-SECRET-099", "2024-01-30 08:00:00", "visit", "0"])  # the log covers the whole horizon
    return out


EV_HEADER = ["cid", "ts", "type", "amount"]


def events(name: str, mutate=None) -> None:
    body = events_rows()
    if mutate:
        body = mutate(body)
    (HERE / name).write_text(csv_text(EV_HEADER, body))


def ev_put(body, i, col, value):
    body[i][EV_HEADER.index(col)] = value
    return body


def main() -> None:
    table("good_table.csv")
    events("good_events.csv")
    # --- structure
    table("sep_semicolon.csv", sep=";")
    table("sep_tab.csv", sep="\t")
    table("sep_pipe.csv", sep="|")
    table("unquoted_decimal_comma.csv", lambda b: [r[:3] + r[3].split(".") + r[4:] if i in (2, 5, 7) else r
                                                   for i, r in enumerate(b)])
    table("missing_field.csv", lambda b: [r[:-1] if i in (1, 4) else r for i, r in enumerate(b)])
    table("missing_column.csv", lambda b: [r[:3] + r[4:] for r in b], header=["cid", "age", "plan", "churned"])
    table("misspelled_column.csv", header=["cid", "Age", "plan", "spend", "churned"])
    table("header_only.csv", lambda b: [])
    (HERE / "empty_file.csv").write_bytes(b"")
    (HERE / "not_utf8.csv").write_bytes(csv_text(HEADER, put(rows(), 3, "plan", "b\xe4sic")).encode("latin-1"))
    (HERE / "corrupt.csv.gz").write_bytes(b"\x1f\x8b\x08\x00SECRETVAL0 not really gzip")
    with gzip.open(HERE / "truncated.csv.gz", "wb") as fh:
        fh.write(csv_text(HEADER, rows()).encode())
    (HERE / "truncated.csv.gz").write_bytes((HERE / "truncated.csv.gz").read_bytes()[:60])
    # --- values
    table("spend_not_number.csv", lambda b: put(put(b, 2, "spend", "SECRETVAL1 EUR"), 6, "spend", "1'234.50"))
    table("age_missing.csv", lambda b: put(b, 3, "age", ""))
    table("spend_infinite.csv", lambda b: put(b, 4, "spend", "inf"))
    table("label_not_binary.csv", lambda b: put(put(b, 1, "churned", "SECRETVAL2"), 8, "churned", "yes"))
    table("no_positives.csv", lambda b: [r[:4] + ["0"] for r in b])
    table("no_negatives.csv", lambda b: [r[:4] + ["1"] for r in b])
    table("duplicate_customer.csv", lambda b: put(b, 7, "cid", b[2][0]))
    table("missing_customer_id.csv", lambda b: put(b, 5, "cid", ""))
    table("too_few_customers.csv", lambda b: b[:3])
    table("plan_out_of_vocabulary.csv", lambda b: put(put(b, 2, "plan", "SECRETVAL3"), 9, "plan", "Basic"))
    table("age_out_of_bounds.csv", lambda b: put(put(b, 1, "age", "250"), 3, "age", "-4"))
    table("duplicate_rows.csv", lambda b: b + [list(b[3]), list(b[3])])
    # --- parquet
    good = pd.DataFrame(rows(), columns=HEADER)
    good.to_parquet(HERE / "good_table.parquet", index=False)
    (HERE / "truncated.parquet").write_bytes((HERE / "good_table.parquet").read_bytes()[:200])
    (HERE / "not_parquet.parquet").write_text(csv_text(HEADER, rows()))
    wrong = good.assign(spend=pd.to_datetime("2024-01-01") + pd.to_timedelta(range(12), unit="D"))
    wrong.to_parquet(HERE / "spend_as_timestamp.parquet", index=False)
    # --- event logs
    events("events_mixed_timezones.csv", lambda b: ev_put(ev_put(b, 2, "ts", "2023-12-11 12:00:00+01:00"), 5, "ts",
                                                          "2023-12-12 12:00:00Z"))
    events("events_bad_timestamp.csv", lambda b: ev_put(b, 3, "ts", "SECRETVAL4"))
    events("events_impossible_date.csv", lambda b: ev_put(b, 1, "ts", "2023-02-30 10:00:00"))
    events("events_day_first.csv", lambda b: ev_put(ev_put(b, 0, "ts", "31/12/2023 10:00"), 4, "ts", "30/11/2023 08:00"))
    events("events_future.csv", lambda b: ev_put(b, 2, "ts", "2031-05-01 00:00:00"))
    events("events_negative_purchase.csv", lambda b: ev_put(b, 1, "amount", "-5.50"))
    events("events_amount_not_number.csv", lambda b: ev_put(b, 4, "amount", "$7.25"))
    events("events_missing_timestamp.csv", lambda b: ev_put(b, 6, "ts", ""))
    events("events_missing_customer.csv", lambda b: ev_put(b, 0, "cid", ""))
    events("events_no_horizon.csv", lambda b: [r for r in b if r[1] < "2024"])
    events("events_log_ends_early.csv", lambda b: [r for r in b if r[1] < "2024-01-14"])
    events("events_everyone_returns.csv", lambda b: b + [[f"ZQ-SECRET-{c:03d}", "2024-01-20 10:00:00", "visit", "0"]
                                                         for c in range(0, 6, 2)])
    events("events_too_few_customers.csv", lambda b: [r for r in b if r[0] in ("ZQ-SECRET-000", "ZQ-SECRET-001",
                                                                             "ZQ-SECRET-099")])
    ev = pd.DataFrame(events_rows(), columns=EV_HEADER)
    ev.assign(ts=pd.to_datetime(ev["ts"]).astype("int64") // 10**9).to_parquet(HERE / "events_ts_as_int.parquet",
                                                                              index=False)
    tbl = pa.table({"cid": ev["cid"], "ts": pa.array(pd.to_datetime(ev["ts"]).dt.to_pydatetime(), pa.timestamp("us")),
                    "type": ev["type"], "amount": ev["amount"]})
    ts = tbl.column("ts").to_pylist()
    import datetime as dt
    ts[2] = dt.datetime(9999, 1, 1)
    tbl = tbl.set_column(1, "ts", pa.array(ts, pa.timestamp("us")))
    pq.write_table(tbl, HERE / "events_year_9999.parquet")


if __name__ == "__main__":
    main()
