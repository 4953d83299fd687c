"""The fedprop run id: what partners key their ledger entries by, kept across a resume (a new Flower run).

Light on purpose (no torch, no flwr): ``fedprop server submit`` draws the id before building the app package.
The coordinator chooses it; a node never releases a (run, round, heads) it already recorded, and a new id is
new spend under the node's own policy (clients/client_app.py ``ledger_run_id``, docs/partner-guide.md).
"""
from __future__ import annotations

import re
import secrets

from federation.errors import FedpropError

RUN_ID_KEY = "fedprop-run-id"  # run config and every train/evaluate message config
RESUME_KEY = "fedprop-resume"  # run config: continue the run in fedprop-run-dir from its last checkpoint
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ResumeError(FedpropError):
    """A run cannot be resumed (or its identity is malformed); the message names the file and what to do."""


def new_run_id() -> str:
    """A fresh fedprop run id from the OS CSPRNG (never from the config seed)."""
    return f"fp-{secrets.token_hex(8)}"


def run_identity(run_config: dict) -> tuple[str, bool]:
    """(fedprop run id, resume?) from a run config; a missing id is drawn here (a new run)."""
    run_id = str(run_config.get(RUN_ID_KEY, "") or "")
    resume = str(run_config.get(RESUME_KEY, "false")).lower() in ("1", "true", "yes")
    if resume and not run_id:
        raise ResumeError(f"run config {RESUME_KEY}=true without {RUN_ID_KEY}: use `fedprop server resume RUN_DIR`, "
                          "which takes both from RUN_DIR/run.json")
    if run_id and not RUN_ID_RE.match(run_id):
        raise ResumeError(f"run config {RUN_ID_KEY}={run_id!r} is not 1-64 letters, digits, '.', '_' or '-'")
    return run_id or new_run_id(), resume
