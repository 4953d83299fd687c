"""Durability: a node killed right after the round's ledger append (before its update is sent) leaves a
verifiable entry; and the server's federation ledger combines with a partner's in one honest report."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from federation.privacy.events import PoissonSampledGaussian
from federation.privacy.ledger import Ledger, verify
from federation.privacy.report import build_report, render_markdown
from server.federation_ledger import open_federation_ledger, record_server_release

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import os, signal, sys
    from flwr.supercore.task_identity import TaskIdentity
    sys.path.insert(0, {tests!r})
    from integration_privacy.conftest import context, initial_arrays, make_cfg, train_msg
    from pathlib import Path
    from clients.client_app import make_client_app
    from federation.privacy.ledger import Ledger
    from simulations.partners import load_partner

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 0
    cfg = make_cfg(Path({tmp!r}), policy=False, rounds=1)
    from federation.privacy.ledger import Reservation
    real = Reservation.commit

    def commit_then_die(self, **kw):
        entry = real(self, **kw)
        print("APPENDED", entry.seq, entry.update_hash, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # dies between the ledger write and the reply

    Reservation.commit = commit_then_die
    app = make_client_app(config=cfg, loader=load_partner)
    reply = app(train_msg(initial_arrays(cfg), 1), context(0, run_id=505))
    print("UPDATE SENT", flush=True)
""")


def test_kill_after_ledger_append_before_send_leaves_a_verifiable_record(tmp_path):
    script = CHILD.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "APPENDED" in proc.stdout and "UPDATE SENT" not in proc.stdout
    seq, update_hash = proc.stdout.split("APPENDED", 1)[1].split()[:2]
    ledger = tmp_path / "ledgers" / "synthetic" / "partner-0.sqlite"
    result = verify(ledger, tmp_path / "ledgers-keys" / "synthetic" / "partner-0.key.pub")  # key outside the ledger's folder
    assert result.entries == int(seq) == 3 and result.head_seq == 3  # run_start, reservation, dpsgd_round
    with Ledger.open(ledger, signing_key=None) as led:
        entry = led.entries()[-1]
    assert entry.kind == "dpsgd_round" and entry.update_hash == update_hash and entry.run_id == "505"


def test_server_ledger_combines_with_partner_report(tmp_path):
    server = open_federation_ledger(tmp_path / "federation.sqlite")
    for rnd in (1, 2, 3):
        record_server_release(server, run_id="7", round=rnd, noise_multiplier=1.2, clipping_norm=0.5,
                              num_sampled=5, num_partners=5, delta=1e-5, update_hash=f"{rnd:064x}")
    server.close()
    sres = verify(tmp_path / "federation.sqlite", tmp_path / "federation.key.pub")
    assert sres.entries == 3 and (tmp_path / "federation.key").stat().st_mode & 0o777 == 0o600

    partner = Ledger.open(tmp_path / "p.sqlite", signing_key=_key(tmp_path / "p.key"))
    for rnd in (1, 2, 3):
        partner.append(kind="dpsgd_round", partner="partner-0", run_id="7", round=rnd, delta=1e-5,
                       mechanism=PoissonSampledGaussian(sampling_rate=0.05, noise_multiplier=1.1, steps=20),
                       clipping_norm=1.0, update_hash="a" * 64)
    with Ledger.open(tmp_path / "federation.sqlite", signing_key=None) as led:
        server_entries = led.entries()
    report = build_report(partner.entries() + server_entries, partner="partner-0")
    pl = report["partner_layer"]
    assert pl["releases"] == 3 and pl["amplified"] is False and pl["runs"] == ["7"]
    assert report["counts"]["dpsgd_rounds"] == 3  # the customer layer is the partner's own, unchanged
    # three unamplified Gaussians with sigma 1.2 at delta 1e-5: a partner gets a weak, honestly stated guarantee
    assert pl["epsilon"]["rdp"] > report["current_period_epsilon"]["rdp"]
    text = render_markdown(report)
    assert "Partner-level layer: the server recorded 3 aggregate release(s)" in text
    assert "without amplification by sampling" in text
    json.dumps(report)


def _key(path):
    from federation.privacy.ledger import generate_node_key

    generate_node_key(path)
    return path
