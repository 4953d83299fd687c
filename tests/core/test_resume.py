"""Resume after a server crash (in-process: the real ClientApp with DP-SGD and ledgers, the real server loops).

A crash is an exception out of the Grid at round k+1: either before any node saw that round, or after one node
trained and recorded it (its reply lost). The resumed run is a new Flower run (fresh node contexts, another
Flower run id) with the same fedprop run id: it continues at round k+1 from the round-k checkpoint, keeps the
round numbers, appends to the same outputs, and no partner's ledger has two entries for one (run, round, heads).
With ``privacy.noise=reproducible`` (noise seeded by seed, partner and round) a resumed run must give exactly
the model of an uninterrupted one, which checks weight continuity and round numbering bit for bit.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from clients.client_app import make_client_app
from federation.privacy.ledger import Ledger
from server.outputs import load_model
from server.run_id import ResumeError
from server.server_app import open_run, run_federation
from simulations.partners import load_partner
from tests.secagg_integration.conftest import InProcessGrid, tiny_config

HEADS = ("churn", "propensity")
TAG = "churn+propensity"
RUN_ID = "fp-resume-test"
SPLIT_KEY = b"\x07" * 32  # the same train/test split in every run below, so models are comparable


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Flower's run identity for messages built in-process (tests/conftest.py)."""


class Crash(RuntimeError):
    """The server process died."""


class CrashingGrid:
    """An InProcessGrid that dies at the first message of round ``crash_round`` of ``stage`` ("train": train or
    SecAgg masked input; "evaluate": after the round's aggregate and checkpoint, before its record), after
    delivering those messages to the partners in ``deliver_to`` (they train and record the round; replies lost)."""

    def __init__(self, inner: InProcessGrid, crash_round: int, deliver_to: tuple[int, ...] = (),
                 stage: str = "train") -> None:
        self.inner, self.crash_round, self.deliver_to, self.stage = inner, crash_round, deliver_to, stage

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def _stage(self, m) -> str:
        return "evaluate" if m.metadata.message_type == "evaluate" else "train" if (
            m.metadata.message_type == "train" or "secagg" in m.content) else "other"

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {int(m.content["config"]["server-round"]) for m in messages if "config" in m.content
                  and self._stage(m) == self.stage}
        if self.crash_round in rounds:
            pids = {n: int(c.node_config["partition-id"]) for n, c in self.inner.contexts.items()}
            self.inner.send_and_receive([m for m in messages if pids[m.metadata.dst_node_id] in self.deliver_to])
            raise Crash(f"server died in round {self.crash_round}")
        return self.inner.send_and_receive(messages, timeout=timeout)


def _cfg(tmp_path, *, secure: bool = False, rounds: int = 3):
    return tiny_config(tmp_path, rounds=rounds, privacy={"noise": "reproducible"}, secagg={"enabled": secure},
                       evaluation={"rounds": rounds})


def _grid(cfg, flower_run_id: int) -> InProcessGrid:
    grid = InProcessGrid(make_client_app(config=cfg, loader=load_partner, split_key=SPLIT_KEY), cfg.partners)
    for ctx in grid.contexts.values():  # a resumed run is a new Flower run: new id, empty node state
        ctx.run_id = flower_run_id
    return grid


def _run(cfg, run_dir, grid, *, flower_run_id: int, resume: bool = False):
    out, run_id, resume = open_run(run_dir, cfg, {"fedprop-run-id": RUN_ID, "fedprop-resume": resume},
                                   flower_run_id=flower_run_id)
    run_federation(grid, cfg, heads=HEADS, out=out, run_id=run_id, resume=resume)
    out.finish()
    return out


def _final(run_dir) -> np.ndarray:
    sd, _ = load_model(run_dir / f"model_{TAG}.pt")
    return np.concatenate([v.numpy().ravel() for v in sd.values()])


def _dpsgd_rounds(ledger_dir) -> dict[str, Counter]:
    """Per partner ledger: how many dpsgd_round entries each (run, round, heads) has."""
    out = {}
    for path in sorted(ledger_dir.rglob("*.sqlite")):
        with Ledger.open(path, signing_key=None) as led:
            out[path.stem] = Counter((e.run_id, e.round, (e.extra or {}).get("heads"))
                                     for e in led.entries() if e.kind == "dpsgd_round")
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final model of an uninterrupted run, per aggregation kind (computed once)."""
    models: dict[bool, np.ndarray] = {}

    def final(secure: bool) -> np.ndarray:
        if secure not in models:
            root = tmp_path_factory.mktemp("reference")
            cfg = _cfg(root, secure=secure)
            _run(cfg, root / "run", _grid(cfg, 1), flower_run_id=1)
            models[secure] = _final(root / "run")
        return models[secure]

    return final


@pytest.mark.parametrize("secure,stage", [(False, "train"), (False, "evaluate"), (True, "train")],
                         ids=["fedavg-between-rounds", "fedavg-after-checkpoint", "secure-between-rounds"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, uninterrupted, secure, stage):
    reference = uninterrupted(secure)
    cfg = _cfg(tmp_path / "b", secure=secure)
    run_dir = tmp_path / "b" / "run"
    with pytest.raises(Crash):
        _run(cfg, run_dir, CrashingGrid(_grid(cfg, 1), crash_round=2, stage=stage), flower_run_id=1)
    assert not (run_dir / "FEDERATION_DONE").exists()
    assert [r["round"] for r in json.loads((run_dir / "federated_rounds.json").read_text())[TAG]] == [1]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"{TAG}_round{i:03d}.pt" for i in ((1, 2) if stage == "evaluate" else (1,))]
    grid = _grid(cfg, 2)
    real = grid.send_and_receive
    grid.sent = []

    def send_and_receive(messages, timeout=None):  # what each node saw when it was sent (Flower reuses the record)
        messages = list(messages)
        grid.sent.extend(int(m.content["config"]["server-round"]) for m in messages if "config" in m.content)
        return real(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    _run(cfg, run_dir, grid, flower_run_id=2, resume=True)
    resumed_at = 3 if stage == "evaluate" else 2  # round 2's checkpoint exists: it is not trained again
    assert sorted(set(grid.sent)) == list(range(resumed_at, 4))  # the run's own round numbers, from k+1
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())[TAG]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    trained = [sorted(p for p, rec in r["partners"].items() if "train" in rec) for r in rounds]
    if stage == "evaluate":  # who trained round 2 died with the server's memory; the ledgers still know
        assert "recovered_from_checkpoint" in rounds[1] and trained[1] == []
        trained[1] = ["0", "1", "2"]
    assert trained == [["0", "1", "2"]] * 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"{TAG}_round{i:03d}.pt" for i in (1, 2, 3)]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["fedprop_run_id"] == RUN_ID and run["flower_runs"] == [1, 2]
    assert np.allclose(_final(run_dir), reference, atol=1e-6), np.abs(_final(run_dir) - reference).max()
    for partner, counts in _dpsgd_rounds(tmp_path / "b" / "ledgers").items():
        assert counts == Counter({(RUN_ID, r, ",".join(HEADS)): 1 for r in (1, 2, 3)}), (partner, counts)


def test_a_round_recorded_before_the_crash_is_not_spent_again(tmp_path, capsys):
    """Partner 0 trained and recorded round 2, then the server died before its reply counted. On resume it refuses
    round 2 (no second spend): a dropout there, with a message; partners 1 and 2 carry the round."""
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        _run(cfg, run_dir, CrashingGrid(_grid(cfg, 1), crash_round=2, deliver_to=(0,)), flower_run_id=1)
    before = _dpsgd_rounds(tmp_path / "ledgers")
    assert before["partner-0"][(RUN_ID, 2, "churn,propensity")] == 1 and before["partner-1"][(RUN_ID, 2, "churn,propensity")] == 0
    _run(cfg, run_dir, _grid(cfg, 2), flower_run_id=2, resume=True)
    rounds = json.loads((run_dir / "federated_rounds.json").read_text())[TAG]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sorted(p for p, rec in rounds[1]["partners"].items() if "train" in rec) == ["1", "2"]
    [refusal] = rounds[1]["refusals"]
    assert refusal["recorded-before-crash"] and "already released and recorded" in refusal["reason"]
    assert "had already recorded this round" in capsys.readouterr().out
    assert sorted(p for p, rec in rounds[2]["partners"].items() if "train" in rec) == ["0", "1", "2"]
    for partner, counts in _dpsgd_rounds(tmp_path / "ledgers").items():
        assert counts == Counter({(RUN_ID, r, "churn,propensity"): 1 for r in (1, 2, 3)}), (partner, counts)


def test_resume_refuses_a_finished_run_a_corrupt_checkpoint_and_another_config(tmp_path):
    cfg = _cfg(tmp_path, rounds=2)
    run_dir = tmp_path / "run"
    with pytest.raises(Crash):
        _run(cfg, run_dir, CrashingGrid(_grid(cfg, 1), crash_round=2), flower_run_id=1)
    other = _cfg(tmp_path, rounds=3)  # another config for the same folder
    with pytest.raises(ResumeError, match="run.json was written under config hash"):
        _run(other, run_dir, _grid(other, 2), flower_run_id=2, resume=True)
    ckpt = run_dir / "checkpoints" / f"{TAG}_round001.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])  # a torn file (written by hand: our writes are atomic)
    with pytest.raises(ResumeError, match=re.escape(f"checkpoint {ckpt} cannot be read") + ".*delete it"):
        _run(cfg, run_dir, _grid(cfg, 2), flower_run_id=2, resume=True)
    ckpt.unlink()
    with pytest.raises(ResumeError, match="records round.*has no churn\\+propensity_roundNNN.pt"):
        _run(cfg, run_dir, _grid(cfg, 2), flower_run_id=2, resume=True)
    ckpt.write_bytes(good)
    _run(cfg, run_dir, _grid(cfg, 2), flower_run_id=2, resume=True)
    with pytest.raises(ResumeError, match="FEDERATION_DONE exists: this run finished"):
        _run(cfg, run_dir, _grid(cfg, 3), flower_run_id=3, resume=True)
    with pytest.raises(ResumeError, match="run.json not found"):
        open_run(tmp_path / "empty", cfg, {"fedprop-run-id": RUN_ID, "fedprop-resume": True}, flower_run_id=4)
