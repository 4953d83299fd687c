import pytest

from federation.config import FedpropConfig, from_dict, from_run_config, to_dict, to_run_config, validate
from federation.errors import ConfigError


def test_defaults_validate():
    assert validate(FedpropConfig()).partners == 5


@pytest.mark.parametrize(
    "override, key",
    [
        ({"privacy": {"epsilon": 0}}, "privacy.epsilon"),
        ({"privacy": {"epsilon": -1.0}}, "privacy.epsilon"),
        ({"privacy": {"delta": 1.0}}, "privacy.delta"),
        ({"partners": 0}, "partners"),
        ({"model": {"kind": "transformer"}}, "model.kind"),
        ({"task": "upsell"}, "task"),
        ({"strategy": {"name": "fedsgd"}}, "strategy.name"),
    ],
)
def test_invalid_values_name_the_key_and_allowed_values(override, key):
    with pytest.raises(ConfigError) as exc:
        from_dict(override)
    assert key in str(exc.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        from_dict({"partners": 0, "privacy": {"epsilon": -1, "delta": 2}})
    msg = str(exc.value)
    assert "partners" in msg and "privacy.epsilon" in msg and "privacy.delta" in msg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="privacy.epsilo"):
        from_dict({"privacy": {"epsilo": 3}})


def test_unknown_model_lists_allowed():
    with pytest.raises(ConfigError, match="logreg, mlp"):
        from_dict({"model": {"kind": "xgboost"}})


def test_run_config_round_trip_is_flat_and_exact():
    cfg = from_dict({"partners": 7, "privacy": {"epsilon": 1.5}, "model": {"hidden": [8, 4]}})
    flat = to_run_config(cfg)
    assert all(isinstance(v, (int, float, bool, str)) for v in flat.values())
    assert flat["fedprop.model.hidden"] == "8,4"
    assert to_dict(from_run_config(flat)) == to_dict(cfg)
