import pytest

from tests.report.runfixture import make_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedprop_run")
    return make_run(root / "run", root / "keys")


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedprop_sweep")
    for i, eps in enumerate((0.5, 2.0, 8.0)):
        make_run(root / "sweep" / str(i), root / "keys", epsilon=eps, rounds=2)
    return root / "sweep"
