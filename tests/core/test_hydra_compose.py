"""Every config group option and the documented overrides compose against the typed schema."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from federation.config import from_dict
from simulations.simulate import _register_schema

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides):
    _register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("data", _options("data"))
def test_every_group_option_composes(model, data):
    cfg = from_dict(OmegaConf.to_container(_compose([f"model={model}", f"data={data}"]), resolve=True))
    assert cfg.model.kind in ("logreg", "mlp")
    assert cfg.data.name == data


def test_issue_example_overrides():
    dcfg = _compose(["partners=8", "rounds=20", "privacy.epsilon=3", "model=mlp", "task=churn"])
    cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True))
    assert (cfg.partners, cfg.rounds, cfg.privacy.epsilon, cfg.task) == (8, 20, 3.0, "churn")


def test_typo_fails_at_compose_time_with_full_key():
    with pytest.raises(ConfigCompositionException, match="epsilo"):
        _compose(["privacy.epsilo=3"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(Exception, match="partners"):
        _compose(["partners=many"])
