"""The DuckDB engine (federation/engine_duckdb.py) equals the pandas path: same reports (message for message),
same feature matrices (bit for bit after encoding), on the corpus, the bundled online_retail log, the default
simulation's partners and generated edge cases; the point-in-time property holds on it; its memory limit and
threads reach DuckDB."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.config import FedpropConfig
from federation.contract import build_features, load_contract
from federation.engine_duckdb import EngineSettings, connect, read_event_features
from federation.errors import DataValidationError
from federation.features import build_event_features, raw_event_features
from federation.featurespec import SYNTHETIC_CATEGORICAL
from federation.validation import read_validated
from simulations.synthetic import generate_partner, partner_profile, partner_sizes, synthetic_dates

CORPUS = Path(__file__).resolve().parent / "corpus"
EVENT_FILES = sorted(p.name for p in CORPUS.iterdir() if p.name.startswith(("events_", "good_events")))
NOW = "2026-01-01"


def _outcome(fn):
    try:
        return "ok", fn()
    except DataValidationError as exc:
        return "error", [(str(p), p.code, p.column, p.count) for p in exc.problems]


def assert_same(contract, path, *, now=NOW, expect_engine="duckdb", **kw):
    """Both paths on one input: identical problems, or identical report, ids, X and labels."""
    a = _outcome(lambda: read_validated(contract, str(path), now=now, **kw))
    b = _outcome(lambda: read_event_features(contract, str(path), now=now, **kw))
    assert a[0] == b[0], (a, b)
    if a[0] == "error":
        assert a[1] == b[1]
        return None
    fs, res = build_features(a[1].frame, contract), b[1]
    assert res.engine.startswith(expect_engine), res.engine
    assert a[1].report == res.report
    assert list(fs.customer_ids) == list(res.features.customer_ids) and fs.feature_names == res.features.feature_names
    np.testing.assert_array_equal(fs.X, res.features.X)
    for k in fs.y:
        np.testing.assert_array_equal(fs.y[k], res.features.y[k])
    return res


@pytest.mark.parametrize("name", EVENT_FILES)
def test_corpus_event_logs_get_the_same_report(name):
    assert_same(load_contract(str(CORPUS / "events.yaml")), CORPUS / name)


@pytest.mark.slow  # ~15 s idle, 30 s on a loaded 2-core machine
def test_online_retail_same_report_and_features(shared_data):
    res = assert_same(load_contract("contracts/online_retail.yaml"), shared_data / "online_retail" / "online_retail.csv.gz",
                      now=None)
    assert res.report.customers == 3370 and len(res.features) == 3370
    assert any("repeat an earlier event" in n for n in res.report.notes)  # duplicates found by the query path


@pytest.mark.slow
def test_online_retail_deduplicated_same(shared_data):
    c = load_contract("contracts/online_retail.yaml").replace(deduplicate=True)
    res = assert_same(c, shared_data / "online_retail" / "online_retail.csv.gz", now=None)
    assert any("duplicate rows dropped" in n for n in res.report.notes)


def _default_partners():
    cfg = FedpropConfig()
    d = cfg.data
    sizes = partner_sizes(cfg.partners, min_customers=d.min_customers, max_customers=d.max_customers, seed=cfg.seed)
    cut, hor = synthetic_dates(d)
    for pid in range(cfg.partners):
        yield (cut, hor), generate_partner(partner_profile(pid, sizes[pid], seed=cfg.seed), seed=cfg.seed, cutoff=cut,
                                           history_days=d.history_days, horizon_days=hor)


SYN_CONTRACT = """name: synthetic_stream
kind: events
columns: {customer_id: user_id, timestamp: timestamp, event_type: event_type, amount: [amount], channel: channel}
events: {cutoff: "2024-01-01", horizon_days: 90, lookback_days: 365}
min_customers: 100
"""


def test_default_simulation_matrices_identical_on_both_engines(tmp_path):
    (tmp_path / "c.yaml").write_text(SYN_CONTRACT)
    contract = load_contract(str(tmp_path / "c.yaml"))
    for pid, (d, (events, customers)) in enumerate(_default_partners()):
        kw = dict(cutoff=d[0], horizon_days=d[1], static=customers, categorical=SYNTHETIC_CATEGORICAL)
        a, b = build_event_features(events, **kw), build_event_features(events, engine="duckdb", **kw)
        assert list(a.customer_ids) == list(b.customer_ids) and a.feature_names == b.feature_names
        np.testing.assert_array_equal(a.X, b.X)
        for k in a.y:
            np.testing.assert_array_equal(a.y[k], b.y[k])
        if pid < 2:  # and the streaming path from a Parquet export of the same log
            path = tmp_path / f"p{pid}.parquet"
            events.to_parquet(path, index=False)
            assert_same(contract, path, now="2030-01-01")


EDGE_CONTRACT = """name: edges
kind: events
columns: {customer_id: cid, timestamp: ts, event_type: type, amount: [amount], channel: ch, product: sku}
events: {activity: [visit, purchase, return], purchase: [purchase], returns: [return], support: [],
         cutoff: "2024-01-01", horizon_days: 30, lookback_days: 90}
static: [{column: region, kind: categorical, vocabulary: [north, south]}]
min_customers: 3
"""


def _edge_log() -> pd.DataFrame:
    C = pd.Timestamp("2024-01-01")
    rows = [
        ("exact", C, "purchase", 50.0, "web", "a", "north"),  # exactly at the cutoff: a label, never a feature
        ("exact", C - pd.Timedelta(days=3), "visit", 0.0, "web", "a", "north"),
        ("one", C - pd.Timedelta(hours=5), "purchase", 12.5, "app", "b", "south"),  # a single event
        ("old", C - pd.Timedelta(days=200), "purchase", 9.0, "web", "c", "north"),  # outside the lookback: absent
        ("old", C + pd.Timedelta(days=2), "visit", 0.0, "web", "c", "north"),
        ("empty7", C - pd.Timedelta(days=60), "visit", 0.0, "store", "a", "east"),  # empty 7/30-day windows
        ("empty7", C - pd.Timedelta(days=89, hours=23), "return", 4.0, "store", "a", "east"),
        ("edge90", C - pd.Timedelta(days=90), "visit", 0.0, "web", "d", None),  # exactly at the lookback edge
        ("edge90", C + pd.Timedelta(days=30), "purchase", 3.0, "web", "d", None),  # exactly at the horizon end
        ("ties", C - pd.Timedelta(days=10), "purchase", 1.0, "web", "a", "south"),  # same time: last row wins
        ("ties", C - pd.Timedelta(days=10), "purchase", 2.0, "app", "b", "north"),
        ("ties", C - pd.Timedelta(days=1), "other", 7.0, "web", "a", None),  # an uncounted type
    ]
    return pd.DataFrame(rows, columns=["cid", "ts", "type", "amount", "ch", "sku", "region"])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "parquet_tz", "csv_tz"])
def test_generated_edge_cases_same_on_both_paths(tmp_path, fmt):
    (tmp_path / "c.yaml").write_text(EDGE_CONTRACT)
    c = load_contract(str(tmp_path / "c.yaml"))
    ev = _edge_log()
    path = tmp_path / ("log.parquet" if fmt.startswith("parquet") else "log.csv")
    if fmt == "parquet_tz":  # stored in another zone: both paths convert to UTC
        ev["ts"] = ev["ts"].dt.tz_localize("UTC").dt.tz_convert("America/New_York")
    if fmt == "csv_tz":  # text offsets: the query path hands over to pandas (same result, says so)
        ev["ts"] = ev["ts"].dt.tz_localize("UTC").dt.tz_convert("Asia/Kolkata").map(lambda t: t.isoformat())
    (ev.to_parquet(path, index=False) if fmt.startswith("parquet") else ev.to_csv(path, index=False))
    res = assert_same(c, path, expect_engine="pandas" if fmt == "csv_tz" else "duckdb")
    ids = list(res.features.customer_ids)
    assert ids == ["edge90", "empty7", "exact", "one", "ties"]  # 'old' has nothing in the lookback window
    raw = raw_event_features(ev.assign(ts=pd.to_datetime(ev["ts"], utc=True).dt.tz_localize(None)).rename(
        columns={"cid": "user_id", "ts": "timestamp", "type": "event_type"}), cutoff=pd.Timestamp("2024-01-01"),
        lookback_days=90)
    assert raw.loc["exact", "frequency"] == 0 and raw.loc["one", "frequency"] == 1
    assert res.features.y["propensity"][ids.index("exact")] == 1 and res.features.y["churn"][ids.index("edge90")] == 1


def test_a_contract_problem_in_a_parquet_log_gets_the_pandas_message(tmp_path):
    (tmp_path / "c.yaml").write_text(EDGE_CONTRACT)
    c = load_contract(str(tmp_path / "c.yaml"))
    ev = pd.concat([_edge_log()] * 40, ignore_index=True)
    ev.loc[[5, 300], "cid"] = None
    ev.loc[7, "amount"] = np.inf
    ev.loc[[8, 9], "type"] = "purchase"
    ev.loc[[8, 9], "amount"] = -3.0
    ev.to_parquet(tmp_path / "bad.parquet", index=False, row_group_size=100)
    with pytest.raises(DataValidationError):
        read_event_features(c, str(tmp_path / "bad.parquet"), now=NOW)
    assert_same(c, tmp_path / "bad.parquet")
    c2 = dataclasses.replace(c, source=dataclasses.replace(c.source, chunksize=97))  # problems across chunks
    assert_same(c2, tmp_path / "bad.parquet")


def _log_with_duplicates() -> pd.DataFrame:
    ev = _edge_log()  # rows 9 and 10 share customer and time but not the other columns: not duplicates
    return pd.concat([ev, ev.iloc[[0, 2, 9, 2]]], ignore_index=True)  # rows 12-15 repeat rows 0, 2, 9 and 2


@pytest.mark.parametrize("dups", [True, False])
@pytest.mark.parametrize("screen", ["hash", "collide"])
def test_the_duplicate_screen_reports_the_rows_validation_reports(tmp_path, monkeypatch, dups, screen):
    """The screen only decides which rows the exact query numbers: with a key under which every customer's rows
    collide (screen='collide': all false positives), and with the real one, the report is validation's."""
    import federation.engine_duckdb as engine

    (tmp_path / "c.yaml").write_text(EDGE_CONTRACT)
    c = load_contract(str(tmp_path / "c.yaml"))
    ev = _log_with_duplicates() if dups else _edge_log()
    ev.to_parquet(tmp_path / "log.parquet", index=False, row_group_size=7)
    exact = []
    real_connect = engine.connect

    class Recording:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *a):
            exact.append("row_number() OVER (PARTITION BY" in sql)
            return self.con.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self.con, name)

    monkeypatch.setattr(engine, "connect", lambda settings=EngineSettings(): Recording(real_connect(settings)))
    if screen == "collide":
        monkeypatch.setattr(engine, "dup_screen_key", lambda cols: f"(hash({cols[0]}) % 2)")
    res = assert_same(c, tmp_path / "log.parquet")
    assert any(exact) == (dups or screen == "collide")  # the exact query runs on a positive screen only
    notes = [n for n in res.report.notes if "repeat an earlier event" in n]
    assert bool(notes) == dups
    if dups:  # the rows named are validation's (assert_same compared the reports); here, that they are the copies
        assert notes[0].startswith("4 row(s)") and "(rows 12, 13, 14, ...)" in notes[0], notes


@pytest.mark.parametrize("screen", ["hash", "collide"])
def test_the_sorted_screen_keeps_every_repeated_key(monkeypatch, screen):
    """The screen sorts the keys and keeps each one equal to its predecessor: with triplicates and more, 0.0 and
    -0.0, NaN and NULL values, dropped rows (NULL customer) and, under screen='collide', keys shared by rows
    that differ, the rows it reports are those of the exact query run on every kept row (200,000 rows on two
    threads: equal keys come from different sorted runs)."""
    import federation.engine_duckdb as engine

    if screen == "collide":
        monkeypatch.setattr(engine, "dup_screen_key", lambda cols: f"(hash({cols[0]}) % 3)")
    con = connect(EngineSettings(threads=2))
    con.execute("SET preserve_insertion_order = false")
    pick = lambda salt, values: f"[{', '.join(values)}][(hash(i, {salt}) % {len(values)})::BIGINT + 1]"  # noqa: E731
    con.execute(
        "CREATE TEMP TABLE t AS SELECT i AS __row, "
        f"{pick(1, ['NULL', repr('a'), repr('b'), repr('c')])} AS cid, (hash(i, 2) % 2000)::BIGINT AS ts, "
        f"{pick(3, ['0.0::DOUBLE', '-0.0::DOUBLE', repr('nan') + '::DOUBLE', 'NULL', '1.5::DOUBLE'])} AS amt, "
        f"{pick(4, ['NULL', repr('web'), repr('app')])} AS ch FROM range(200000) r(i)")
    con.execute("CREATE TEMP VIEW ev AS SELECT *, cid IS NOT NULL AS keep FROM t")
    con.execute("CREATE TEMP VIEW evr AS SELECT * FROM ev")
    cols = ["cid", "ts", "amt", "ch"]
    exact = engine._duplicate_rows(con, True, cols)  # no screen: every kept row numbered by the exact query
    screened = engine._duplicate_rows(con, False, cols)
    assert 50_000 < len(exact) < 150_000 and np.array_equal(screened, exact)
    con.close()


# ---- the point-in-time property on the DuckDB engine (as tests/data/test_leakage.py does for pandas)
CUT = pd.Timestamp("2024-01-01")
TYPES = ["visit", "purchase", "support_ticket", "return"]


def _log(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.choice([f"c{i}" for i in range(12)], n),
        "timestamp": CUT + pd.to_timedelta(rng.integers(-400 * 86400, 120 * 86400, n), unit="s"),
        "event_type": rng.choice(TYPES, n), "amount": np.round(rng.exponential(30.0, n), 2),
        "channel": rng.choice(["web", "app", "store"], n), "product": rng.choice(["a", "b", "c", "d"], n),
    })


future_event = st.tuples(st.sampled_from([f"c{i}" for i in range(15)]), st.integers(0, 200 * 86400),
                         st.sampled_from(TYPES), st.floats(0, 1e4, allow_nan=False), st.sampled_from(["web", "x"]),
                         st.sampled_from(["a", "z"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 80), extra=st.lists(future_event, max_size=25))
def test_future_events_never_change_duckdb_features(seed, n, extra):
    ev = _log(seed, n)
    base = raw_event_features(ev, cutoff=CUT, engine="duckdb")
    pd.testing.assert_frame_equal(base, raw_event_features(ev, cutoff=CUT), check_index_type=False, rtol=1e-12)
    add = pd.DataFrame(extra, columns=["user_id", "sec", "event_type", "amount", "channel", "product"])
    add["timestamp"] = CUT + pd.to_timedelta(add.pop("sec"), unit="s")
    grown = pd.concat([ev, add[ev.columns]], ignore_index=True).sample(frac=1.0, random_state=seed)
    after = raw_event_features(grown, cutoff=CUT, engine="duckdb")
    assert list(base.index) == list(after.index)
    pd.testing.assert_frame_equal(base, after, check_index_type=False, rtol=1e-12)


# ---- resources
def test_memory_limit_and_threads_reach_duckdb(tmp_path):
    con = connect(EngineSettings(memory_limit="300MB", threads=1, temp_directory=str(tmp_path)))
    limit, threads, tmp = con.execute("SELECT current_setting('memory_limit'), current_setting('threads'), "
                                      "current_setting('temp_directory')").fetchone()
    assert limit.startswith("286") and threads == 1 and tmp == str(tmp_path)  # 300 MB = 286.1 MiB
    with pytest.raises(ValueError, match="memory_limit"):
        EngineSettings(memory_limit="lots")


def test_a_tight_memory_limit_gives_the_same_features(tmp_path):
    (tmp_path / "c.yaml").write_text(SYN_CONTRACT)
    contract = load_contract(str(tmp_path / "c.yaml"))
    d, (events, _) = next(_default_partners())
    events.to_parquet(tmp_path / "p.parquet", index=False)
    tight = read_event_features(contract, str(tmp_path / "p.parquet"), now="2030-01-01",
                                settings=EngineSettings(memory_limit="48MB", threads=1, temp_directory=str(tmp_path / "spill")))
    ref = read_event_features(contract, str(tmp_path / "p.parquet"), now="2030-01-01")
    assert tight.engine == "duckdb" and tight.report == ref.report
    np.testing.assert_array_equal(tight.features.X, ref.features.X)


def test_integer_customer_ids_sort_as_validation_text(tmp_path):
    """Parquet int64 ids: the query groups by the integer, and orders by its text ('10' < '9') like validation."""
    (tmp_path / "c.yaml").write_text(SYN_CONTRACT)
    rng = np.random.default_rng(7)
    n = 20_000
    ev = pd.DataFrame({
        "user_id": rng.integers(0, 3000, n).astype(np.int64),
        "timestamp": pd.Timestamp("2023-01-01") + pd.to_timedelta(rng.integers(0, 455 * 86400, n), unit="s"),
        "event_type": rng.choice(TYPES, n), "amount": np.round(rng.lognormal(3.0, 0.7, n), 2),
        "channel": rng.choice(["web", "app"], n),
    })
    ev.to_parquet(tmp_path / "ints.parquet", index=False)
    res = assert_same(load_contract(str(tmp_path / "c.yaml")), tmp_path / "ints.parquet", now="2030-01-01")
    assert res is not None, "the generated log should pass validation"
    assert list(res.features.customer_ids[:3]) == ["0", "1", "10"]


def test_a_deployed_node_builds_event_features_with_the_duckdb_engine(tmp_path, monkeypatch):
    from clients.local_data import load_node_features

    (tmp_path / "c.yaml").write_text(SYN_CONTRACT)
    d, (events, _) = next(_default_partners())
    events.to_parquet(tmp_path / "p.parquet", index=False)
    import federation.engine_duckdb as engine

    seen = []
    real_connect = engine.connect
    monkeypatch.setattr(engine, "connect", lambda settings: seen.append(settings) or real_connect(settings))
    monkeypatch.setenv("FEDPROP_DUCKDB_MEMORY", "512MB")
    fs = load_node_features(FedpropConfig(), {"data-path": str(tmp_path / "p.parquet"), "contract": str(tmp_path / "c.yaml"),
                                              "duckdb-memory-limit": "300MB"})
    assert seen and all(st.memory_limit == "300MB" for st in seen)  # node config beats the environment
    c = load_contract(str(tmp_path / "c.yaml"))
    ref = build_features(read_validated(c, str(tmp_path / "p.parquet"), delta=1e-5).frame, c)
    assert list(fs.customer_ids) == list(ref.customer_ids)
    np.testing.assert_array_equal(fs.X, ref.X)


def test_the_memory_limit_comes_from_node_config_then_environment_then_run_config(monkeypatch):
    from federation.config import validate
    from federation.engine_duckdb import default_settings
    from federation.errors import ConfigError

    monkeypatch.delenv("FEDPROP_DUCKDB_MEMORY", raising=False)
    cfg = FedpropConfig()
    assert cfg.data.engine_memory_limit == "2GB" and default_settings(cfg.data.engine_memory_limit).memory_limit == "2GB"
    assert default_settings("3GB").memory_limit == "3GB"
    monkeypatch.setenv("FEDPROP_DUCKDB_MEMORY", "700MB")
    assert default_settings("3GB").memory_limit == "700MB"
    s = default_settings("3GB", {"duckdb-memory-limit": "1GiB", "duckdb-threads": "1"})
    assert (s.memory_limit, s.threads) == ("1GiB", 1)
    with pytest.raises(ConfigError, match="node config duckdb-memory-limit"):
        default_settings("3GB", {"duckdb-memory-limit": "a lot"})
    monkeypatch.delenv("FEDPROP_DUCKDB_MEMORY")
    with pytest.raises(ConfigError, match="data.engine_memory_limit"):
        default_settings("2 gigs")
    cfg.data.engine_memory_limit = "2 gigs"
    with pytest.raises(ConfigError, match="data.engine_memory_limit"):
        validate(cfg)


def test_online_retail_simulation_partners_identical_on_both_engines(shared_data, monkeypatch):
    """What an online_retail simulation trains on is the same matrix whichever engine builds the features."""
    import functools

    import federation.contract as contract_mod
    from simulations import realdata

    d = FedpropConfig().data
    for k, v in dict(name="online_retail", kind="events", contract="contracts/online_retail.yaml",
                     cutoff="2011-09-10", horizon_days=91, partitioner="natural").items():
        setattr(d, k, v)
    n = realdata.num_natural_partners(d)
    assert n and n >= 2
    pandas_fs = [realdata.load_partner_features(d, partition_id=i, num_partitions=n, seed=0) for i in range(n)]
    calls = []
    duck = functools.partial(contract_mod.build_event_features, engine="duckdb")
    monkeypatch.setattr(contract_mod, "build_event_features", lambda *a, **kw: calls.append(1) or duck(*a, **kw))
    for i, a in enumerate(pandas_fs):
        b = realdata.load_partner_features(d, partition_id=i, num_partitions=n, seed=0)
        assert list(a.customer_ids) == list(b.customer_ids) and a.feature_names == b.feature_names
        np.testing.assert_array_equal(a.X, b.X)
        for k in a.y:
            np.testing.assert_array_equal(a.y[k], b.y[k])
    assert len(calls) == n  # every partner went through the DuckDB engine


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("dedup", [False, True])
def test_the_feature_pass_split_by_customer_hash_gives_the_same_result(tmp_path, monkeypatch, fmt, dedup):
    """A large log is aggregated in several passes (each the customers of one hash partition, so a pass fits in
    memory instead of spilling): forced here to 3 passes on a small log, with duplicates, edge cases and a
    deduplicating contract, the features, labels and report equal the pandas path's."""
    import federation.engine_duckdb as engine

    passes = []
    monkeypatch.setattr(engine, "PASS_MIN_ROWS", 0)
    monkeypatch.setattr(engine, "aggregate_passes", lambda customers, limit: passes.append(customers) or 3)
    text = EDGE_CONTRACT.replace("lookback_days: 90}", "lookback_days: 90, drop_missing_customer: true}") + (
        "deduplicate: true\n" if dedup else "")
    (tmp_path / "c.yaml").write_text(text)
    c = load_contract(str(tmp_path / "c.yaml"))
    ev = _log_with_duplicates()
    ev.loc[len(ev)] = [None, pd.Timestamp("2023-12-20"), "visit", 0.0, "web", "a", "north"]  # no customer: dropped
    path = tmp_path / f"log.{fmt}"
    ev.to_parquet(path, index=False) if fmt == "parquet" else ev.to_csv(path, index=False)
    res = assert_same(c, path)
    assert res.report.rows_read == len(ev)
    assert res.timings["aggregate_passes"] == 3 and passes and passes[0] >= 5  # the customer estimate was made
    assert len(res.features.customer_ids) == 5


def test_the_number_of_passes_fits_the_memory_limit():
    from federation.engine_duckdb import aggregate_passes, memory_bytes

    assert memory_bytes("2GB") == 2 * 10**9 and memory_bytes("512MiB") == 512 * 2**20
    assert aggregate_passes(200_000, "2GB") == 1 and aggregate_passes(1_900_000, "2GB") == 2
    assert aggregate_passes(1_900_000, "4GB") == 1 and aggregate_passes(20_000_000, "2GB") == 14
    with pytest.raises(ValueError, match="2GB"):
        memory_bytes("lots")
