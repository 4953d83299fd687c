"""Session-wide test settings: partner ledgers go to a temporary directory, never into ./runs."""
import os
import tempfile

os.environ.setdefault("FEDPROP_LEDGER_DIR", tempfile.mkdtemp(prefix="fedprop-test-ledgers-"))
os.environ.setdefault("FEDPROP_KEY_DIR", tempfile.mkdtemp(prefix="fedprop-test-keys-"))  # server signing key
