"""`fedprop simulate` refuses bad input before anything starts, leaves nothing behind, and keeps partner data
unreadable on disk: missing data, bad config, no run folder on failure, unique run folders, the encrypted
partner cache under kill -9 and SIGTERM, and the exit code of a federation in which nobody trained."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from federation.config import from_dict
from federation.errors import ConfigError, FedpropError
from simulations import partners as P
from simulations import simulate as S
from simulations.preflight import PreflightError

REPO = Path(__file__).resolve().parents[2]
FEDPROP = [sys.executable, "-c", "import sys; from simulations.cli import main; sys.exit(main())"]


def _fedprop(args, cwd, **env):
    e = {**os.environ, "PYTHONPATH": str(REPO), **env}
    e.pop("FEDPROP_LEDGER_DIR", None)
    t0 = time.perf_counter()
    r = subprocess.run([*FEDPROP, "simulate", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)
    return r, time.perf_counter() - t0


def test_missing_data_dir_is_refused_in_seconds_before_ray(tmp_path):
    r, secs = _fedprop(["data=telco_churn"], tmp_path, FEDPROP_DATA_DIR="/nonexistent")
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert secs < 60  # imports only (torch, pandas); before the fix: Ray, every round, 20,035 lines
    assert len(out.strip().splitlines()) <= 8, out
    assert "does not exist" in out and "/nonexistent/telco_churn/" in out
    assert "Traceback" not in out and "raylet" not in out and "ClientAppActor" not in out and "round" not in out
    assert list(tmp_path.iterdir()) == []  # no runs/<ts>/.hydra, no ledger, no cache


@pytest.mark.parametrize("override,needle", [("privacy.epsilon=inf", "privacy.epsilon=inf must be a finite number"),
                                             ("privacy.epsilon=0", "privacy.epsilon=0.0 must be"),
                                             ("privacy.epsilon=abc", "privacy.epsilon")])
def test_bad_config_refused_at_start_naming_the_key_and_leaving_nothing(tmp_path, override, needle):
    r, _ = _fedprop([override], tmp_path)
    assert r.returncode != 0 and needle in r.stderr + r.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_key_or_group_names_what_exists(tmp_path):
    """Hydra's own message named the key and suggested '+baseline.enabled=false' (which the schema refuses too);
    now every mistyped key is listed with the close match and the keys that exist, and nothing runs."""
    r, _ = _fedprop(["privacy.epsilo=3", "baseline.enabled=false", "data=telco", "data.partition_by=Region"], tmp_path)
    err = r.stderr
    assert r.returncode == 2 and "Traceback" not in err
    assert "did you mean 'privacy.epsilon'?" in err and "did you mean 'baselines'?" in err
    assert "data=telco: no such data config; choose one of" in err and "telco_churn" in err
    assert err.count("\n  - ") == 3  # data.partition_by is a right key: not reported
    assert list(tmp_path.iterdir()) == []


def test_epsilon_inf_is_a_config_error():
    with pytest.raises(ConfigError, match=r"privacy\.epsilon=inf must be a finite number > 0"):
        from_dict({"privacy": {"epsilon": float("inf")}})


def test_run_folders_are_unique_within_one_second(tmp_path):
    made: list[Path] = []
    lock = threading.Lock()

    def go():
        p = S._unique_dir(tmp_path / "runs")
        with lock:
            made.append(p)

    threads = [threading.Thread(target=go) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({str(p) for p in made}) == 12 and all(p.is_dir() for p in made)


def test_preflight_failure_never_starts_the_federation(tmp_path, monkeypatch):
    import flwr.simulation

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("the federation started"))
    monkeypatch.setenv("FEDPROP_DATA_DIR", str(tmp_path / "nothing-here"))
    cfg = from_dict({"data": {"name": "telco_churn", "kind": "table", "contract": "contracts/telco_churn.yaml"},
                     "partners": 4, "task": "churn", "privacy": {"ledger_dir": str(tmp_path / "ledgers")}})
    with pytest.raises(PreflightError, match=r"1 problem\(s\);(.|\n)*every partner \(one shared file\): 1 problem"):
        S.run_simulation(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"{P.CACHE_PREFIX}{os.getpid()}-*"))


def test_no_partner_trained_is_an_error():
    cfg = from_dict({"task": "churn"})
    refused = {"churn": [{"round": r, "partners": {"0": {"refused": True}}, "refusals": [0]} for r in (1, 2)]}
    with pytest.raises(FedpropError, match="no partner trained in federation churn .2 refusal"):
        S._trained_check(refused, cfg, Path("run"))
    S._trained_check({"churn": [{"round": 1, "partners": {"0": {"train": {}}}, "refusals": []}]}, cfg, Path("run"))
    with pytest.raises(FedpropError):
        S._trained_check({}, cfg, Path("run"))


# ---------------------------------------------------------------------------- the partner cache on disk
CACHE_CHILD = textwrap.dedent("""
    import os, secrets, sys, time
    from federation.config import from_dict
    from simulations import partners as P
    cfg = from_dict({"partners": 2, "data": {"min_customers": 300, "max_customers": 400}})
    d = P.new_cache_dir(sys.argv[1])
    fs = P.cached_partner(cfg, {"partition-id": 0, "num-partitions": 2}, cache_dir=d, key=secrets.token_bytes(32))
    print(d, flush=True)
    time.sleep(120)
""")


def _ids(cfg_partner0) -> list[str]:
    return [str(c) for c in cfg_partner0.customer_ids]


def test_kill_9_leaves_no_readable_partner_data_and_the_next_run_deletes_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CACHE_CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        cache = Path(child.stdout.readline().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert cache.is_dir() and stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = list(cache.iterdir())
    assert len(files) == 1
    blob = files[0].read_bytes()
    cfg = from_dict({"partners": 2, "data": {"min_customers": 300, "max_customers": 400}})
    fs = P.load_partner(cfg, {"partition-id": 0, "num-partitions": 2})
    assert not any(i.encode() in blob for i in _ids(fs)[:50])  # no customer id in the clear
    assert not any(i.encode("utf-32-le") in blob for i in _ids(fs)[:50])  # numpy stores str arrays as UTF-32
    with pytest.raises(Exception):
        np.load(files[0], allow_pickle=False)  # not an npz: ciphertext
    assert P.purge_stale_caches(str(tmp_path)) == [str(cache)] and not cache.exists()


SIGTERM_CHILD = textwrap.dedent("""
    import sys, time
    import simulations.preflight as PF
    from federation.config import from_dict
    from simulations import simulate as S

    def slow_preflight(cfg, *, loader, split_key):
        loader(cfg, {"partition-id": 0, "num-partitions": cfg.partners})
        print(loader.keywords["cache_dir"], flush=True)
        time.sleep(120)

    PF.preflight = slow_preflight
    cfg = from_dict({"partners": 2, "data": {"min_customers": 300, "max_customers": 400},
                     "privacy": {"ledger_dir": sys.argv[1] + "/ledgers"}})
    S.run_simulation(cfg, sys.argv[1] + "/run")
""")


def test_sigterm_deletes_the_partner_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    cache = Path(child.stdout.readline().strip())
    assert cache.is_dir() and any(cache.iterdir())
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert not cache.exists()
