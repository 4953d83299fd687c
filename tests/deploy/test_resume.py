"""kill -9 the SuperLink mid-run, restart it, `fedprop server resume RUN_DIR`: the run continues at round 2 from
its round-1 checkpoint with the same fedprop run id, and ends with the model of an uninterrupted run.

A loopback deployment as `fedprop server start` runs it (tests/deploy/harness.py: TLS, node authentication,
Fleet proxy, three named partners with their own ledgers). Both runs use ``privacy.noise=reproducible`` (noise
seeded by seed, partner and round; NO guarantee against the seed's holders: test only), so "equal within DP
noise" is checked exactly: same nodes, same split keys, same rounds -> the same model, unless a partner had
already trained and recorded round 2 when the SuperLink died. Then that partner refuses round 2 on resume (no
second spend) and is a dropout there; the test says which case it met and checks that case's outcome. In both,
no partner ledger has two dpsgd_round entries for one (run, round, heads).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from federation.config import from_dict, to_run_config
from federation.privacy.ledger import Ledger, verify
from server import deploy
from server.outputs import load_model

PARTNERS = ["acme", "globex", "initech"]
TAG = "churn+propensity"
HEADS = "churn,propensity"


def _cfg(tmp_path: Path):
    return from_dict({
        "partners": 3, "rounds": 2, "model": {"kind": "logreg", "hidden": []},
        "data": {"min_customers": 400, "max_customers": 900}, "baselines": {"enabled": False},
        # two runs of epsilon 2 fit one month of the nodes' default policy (5)
        "privacy": {"epsilon": 2.0, "noise": "reproducible", "ledger_dir": str(tmp_path / "unused-ledgers")},
        "release": {"key_dir": str(tmp_path / "keys")}, "evaluation": {"rounds": 1},
        "strategy": {"min_partners": 2, "round_timeout": 300.0},
    })


def _superlink_pid(server: deploy.ManagedProcess) -> int:
    for pid in deploy._descendants(server.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"flower-superlink") for part in cmd):
            return pid
    raise AssertionError("no flower-superlink process under `fedprop server start`")


def _final(run_dir: Path) -> np.ndarray:
    sd, _ = load_model(run_dir / f"model_{TAG}.pt")
    return np.concatenate([v.numpy().ravel() for v in sd.values()])


def _ledger_rounds(fed, partner: str) -> Counter:
    path = fed.node_dir(partner) / "ledger.sqlite"
    verify(path, fed.root / "ledger-keys" / partner / f"{partner}-ledger.key.pub")  # chain + signatures intact
    with Ledger.open(path, signing_key=None) as led:
        return Counter((e.run_id, e.round, (e.extra or {}).get("heads")) for e in led.entries() if e.kind == "dpsgd_round")


@pytest.mark.slow  # several deployment rounds (tens of seconds each on 2 cores) plus a SuperLink restart
def test_kill9_superlink_mid_run_and_resume(tmp_path):
    from tests.deploy.harness import CLEAN_PATH, FEDPROP, HOST, PUBLIC, REPO, clean_env, loopback_federation

    cfg = _cfg(tmp_path)
    crashed, reference = tmp_path / "run-crashed", tmp_path / "run-reference"
    t0 = time.monotonic()
    with loopback_federation(tmp_path / "fed", PARTNERS,  # the nodes allow the run's reproducible noise
                             extra_node_config={"allow-reproducible-noise": True}) as fed:
        outcome: dict = {}

        def submit():
            try:
                outcome["result"] = fed.submit(REPO, {**to_run_config(cfg), "fedprop-run-dir": str(crashed)}, timeout=900)
            except BaseException as exc:  # noqa: BLE001 - the run dies with the SuperLink: expected
                outcome["error"] = exc

        worker = threading.Thread(target=submit, daemon=True)
        worker.start()
        ckpt = crashed / "checkpoints" / f"{TAG}_round001.pt"
        deadline = time.monotonic() + 900
        while not ckpt.exists() and time.monotonic() < deadline and worker.is_alive():
            time.sleep(0.05)
        assert ckpt.exists(), f"round 1 never checkpointed: {outcome}"
        os.kill(_superlink_pid(fed.server), signal.SIGKILL)  # mid-run: round 2 is being sent
        killed_at = time.monotonic() - t0
        assert fed.server.wait(timeout=60) != 0  # `fedprop server start` stops the rest and fails
        worker.join(timeout=120)
        run_id = json.loads((crashed / "run.json").read_text())["fedprop_run_id"]
        recorded_2 = [p for p in PARTNERS if _ledger_rounds(fed, p)[(run_id, 2, HEADS)]]

        # the coordinator restarts its SuperLink (same state dir and ports); the partners' nodes reconnect
        fleet_port, control_port = fed.fleet.rsplit(":", 1)[1], fed.control.rsplit(":", 1)[1]
        restarted = deploy.ManagedProcess(
            [FEDPROP, "server", "start", "--certs", str(fed.certs), "--host", PUBLIC, "--port", fleet_port,
             "--control-port", control_port, "--state-dir", str(fed.state)],
            env=clean_env(), log_path=fed.root / "server-restart.log", cwd=fed.root)
        try:
            deploy.wait_for_port(HOST, int(control_port), timeout=60, process=restarted)
            deploy.wait_for_port(PUBLIC, int(fleet_port), timeout=60, process=restarted)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                if sum(n.get("status") == "online" for n in deploy.list_nodes(fed.conn)) == len(PARTNERS):
                    break
                time.sleep(1)
            # `fedprop server resume` refuses what it cannot resume before submitting anything
            bad = subprocess.run([FEDPROP, "server", "resume", str(tmp_path / "nowhere"), "--certs", str(fed.certs),
                                  "--superlink", fed.control, "--app-key", str(fed.app_key)],
                                 capture_output=True, text=True, env={**clean_env(), "PATH": CLEAN_PATH}, cwd=fed.root)
            assert bad.returncode == 2 and "run.json not found" in bad.stderr, bad.stderr
            t_resume = time.monotonic()
            resumed = subprocess.run(
                [FEDPROP, "server", "resume", str(crashed), "--app-dir", str(REPO), "--certs", str(fed.certs),
                 "--superlink", fed.control, "--state-dir", str(fed.root / "resume-cli"), "--app-key",
                 str(fed.app_key), "--signatures-dir", str(fed.signatures), "--timeout", "900"],
                capture_output=True, text=True, env=clean_env(), cwd=fed.root, timeout=1000)
            resume_s = time.monotonic() - t_resume
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert f"fedprop run {run_id}, resumed" in resumed.stdout
            again = subprocess.run([FEDPROP, "server", "resume", str(crashed), "--certs", str(fed.certs),
                                    "--superlink", fed.control, "--app-key", str(fed.app_key)],
                                   capture_output=True, text=True, env=clean_env(), cwd=fed.root)
            assert again.returncode == 2 and "FEDERATION_DONE exists" in again.stderr, again.stderr
            # the uninterrupted run, on the same nodes (a new fedprop run id: new spend, within the policy)
            ref = deploy.submit_run(REPO, fed.conn, {**to_run_config(cfg), "fedprop-run-dir": str(reference)},
                                    app_signing_key=fed.app_key, signatures_dir=fed.signatures, timeout=900)
            assert ref.completed, ref.status
            ledgers = {p: _ledger_rounds(fed, p) for p in PARTNERS}
        finally:
            deploy.stop_all(list(fed.nodes.values()))
            deploy.stop_all([restarted])
    rounds = json.loads((crashed / "federated_rounds.json").read_text())[TAG]
    print(f"SuperLink killed at {killed_at:.0f} s; partners that had recorded round 2: {recorded_2 or 'none'}; "
          f"resume took {resume_s:.0f} s; whole test {time.monotonic() - t0:.0f} s")
    assert [r["round"] for r in rounds] == [1, 2]
    assert json.loads((crashed / "run.json").read_text())["fedprop_run_id"] == run_id
    assert len(json.loads((crashed / "run.json").read_text())["flower_runs"]) == 2
    trained_2 = sorted(p for p, rec in rounds[1]["partners"].items() if "train" in rec)
    assert trained_2 == sorted(set(PARTNERS) - set(recorded_2))  # a recorded round is a dropout, not a second spend
    assert sorted(r["node"] for r in rounds[1]["refusals"] if r.get("recorded-before-crash")) == sorted(
        fed.node_ids[p] for p in recorded_2)
    ref_id = json.loads((reference / "run.json").read_text())["fedprop_run_id"]
    assert ref_id != run_id
    for p in PARTNERS:  # exactly one dpsgd_round per (run, round, heads), for both runs
        assert ledgers[p] == Counter({(rid, r, HEADS): 1 for rid in (run_id, ref_id) for r in (1, 2)}), (p, ledgers[p])
    if not recorded_2:  # nobody had trained round 2: the resumed run is the uninterrupted run
        assert np.allclose(_final(crashed), _final(reference), atol=1e-6), np.abs(_final(crashed) - _final(reference)).max()
    else:  # round 2 without the partners that had spent it: a different, still trained model
        from tests.modelcheck import fresh_synthetic_auc

        assert fresh_synthetic_auc(cfg, crashed / f"model_{TAG}.pt", "churn") > 0.6
