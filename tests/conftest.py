"""Session-wide test settings: partner ledgers go to a temporary directory, never into ./runs; the session's
generated keys and ledgers are removed when it ends (test private keys never outlive the run)."""
import atexit
import os
import shutil
import tempfile

import pytest


def _session_dir(var: str, prefix: str) -> None:
    if var in os.environ:  # the caller chose the folder: it is theirs to keep
        return
    path = tempfile.mkdtemp(prefix=prefix)
    os.environ[var] = path
    # Siblings such as "<ledger dir>-keys" are created next to it by the ledger's key store.
    atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in (path, path + "-keys")])


_session_dir("FEDPROP_LEDGER_DIR", "fedprop-test-ledgers-")
_session_dir("FEDPROP_KEY_DIR", "fedprop-test-keys-")  # server signing key


@pytest.fixture
def flower_task_identity(monkeypatch):
    """Outside a real ServerApp process Flower has no run identity for new messages; give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
