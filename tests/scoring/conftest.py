import pytest

from simulations.synth_cli import synth_events, write_frame
from tests.report.runfixture import make_run


@pytest.fixture(scope="session")
def signed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedprop_scoring")
    return make_run(root / "run", root / "keys", rounds=1)


@pytest.fixture(scope="session")
def events_csv(tmp_path_factory):
    """A small synthetic partner's raw event log, as `fedprop data synth` writes it."""
    path = tmp_path_factory.mktemp("fedprop_data") / "partner0.csv"
    write_frame(synth_events(0, 2, min_customers=150, max_customers=250), path)
    return path
