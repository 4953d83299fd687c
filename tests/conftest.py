"""Session-wide test settings: partner ledgers go to a temporary directory, never into ./runs."""
import os
import tempfile

import pytest

os.environ.setdefault("FEDPROP_LEDGER_DIR", tempfile.mkdtemp(prefix="fedprop-test-ledgers-"))
os.environ.setdefault("FEDPROP_KEY_DIR", tempfile.mkdtemp(prefix="fedprop-test-keys-"))  # server signing key


@pytest.fixture
def flower_task_identity(monkeypatch):
    """Outside a real ServerApp process Flower has no run identity for new messages; give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
