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


@pytest.mark.parametrize("eps, clip, rounds", [(0.5, 1.0, 10), (1.0, 1.0, 10), (1.99, 1.0, 10), (2.0, 2.0, 10),
                                               (3.0, 2.0, 20), (8.0, 2.0, 20)])
def test_auto_clip_and_rounds_follow_the_declared_epsilon(eps, clip, rounds):
    from federation.config import AUTO_SCHEDULE, auto_schedule

    cfg = from_dict({"privacy": {"epsilon": eps}})
    assert (cfg.privacy.max_grad_norm, cfg.rounds) == (clip, rounds) == auto_schedule(eps)
    assert [r[0] for r in AUTO_SCHEDULE] == sorted(r[0] for r in AUTO_SCHEDULE) and AUTO_SCHEDULE[0][0] == 0


def test_explicit_clip_and_rounds_win_and_no_dp_takes_the_first_row():
    cfg = from_dict({"rounds": 7, "privacy": {"epsilon": 3.0, "max_grad_norm": 0.5}})
    assert (cfg.rounds, cfg.privacy.max_grad_norm) == (7, 0.5)
    assert from_dict({"rounds": 0, "privacy": {"epsilon": 8.0, "max_grad_norm": 3.0}}).rounds == 20
    off = from_dict({"privacy": {"enabled": False, "epsilon": 8.0}})
    assert (off.rounds, off.privacy.max_grad_norm) == (10, 1.0)


def test_auto_values_resolve_identically_on_server_and_node_and_travel_resolved():
    # The server's typed config and a node's config parsed from the same declared run config (0 = auto) agree,
    # so the plan check and the config hash match; the resolved numbers are what to_run_config sends.
    declared = to_run_config(FedpropConfig())
    assert declared["fedprop.rounds"] == 0 and declared["fedprop.privacy.max_grad_norm"] == 0.0
    declared["fedprop.privacy.epsilon"] = 1.0
    server, node = from_run_config(dict(declared)), from_run_config(dict(declared))
    assert to_dict(server) == to_dict(node) and (server.rounds, server.privacy.max_grad_norm) == (10, 1.0)
    sent = to_run_config(server)
    assert (sent["fedprop.rounds"], sent["fedprop.privacy.max_grad_norm"]) == (10, 1.0)
    assert to_dict(from_run_config(sent)) == to_dict(server)


@pytest.mark.parametrize("override, key", [({"rounds": -1}, "rounds="), ({"privacy": {"max_grad_norm": -1.0}},
                                                                         "privacy.max_grad_norm=")])
def test_negative_auto_keys_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key) as exc:
        from_dict(override)
    assert "0: chosen from privacy.epsilon" in str(exc.value)


@pytest.mark.parametrize("override, key", [
    ({"rounds": 2.5}, "rounds=2.5 must be an integer"), ({"rounds": float("nan")}, "rounds=nan must be an integer"),
    ({"rounds": True}, "rounds=True must be an integer"), ({"rounds": "0"}, "rounds='0' must be an integer"),
    ({"privacy": {"epsilon": "3.0"}}, "privacy.epsilon='3.0' must be a number"),
    ({"privacy": {"epsilon": True}}, "privacy.epsilon=True must be a number"),
    ({"privacy": {"max_grad_norm": "0"}}, "privacy.max_grad_norm='0' must be a number"),
    ({"privacy": {"max_grad_norm": float("inf")}}, "privacy.max_grad_norm=inf must be a finite number"),
    ({"privacy": {"enabled": 1}}, "privacy.enabled=1 must be true or false"),
])
def test_wrongly_typed_values_are_refused_naming_the_key(override, key):
    # A coordinator's (or a typo's) string epsilon must not read as "no DP", nor a float round count reach range().
    with pytest.raises(ConfigError) as exc:
        from_dict(override)
    assert key in str(exc.value)


def test_an_integral_float_round_count_is_an_integer():
    cfg = from_dict({"rounds": 20.0})
    assert cfg.rounds == 20 and type(cfg.rounds) is int


def test_auto_reads_the_epsilon_of_one_federation_with_separate_heads():
    # task=both with separate heads trains two federations at epsilon / 2 each (clients/node.py:run_share).
    from federation.config import auto_schedule

    two = from_dict({"task": "both", "model": {"heads": "separate"}, "privacy": {"epsilon": 3.0}})
    assert (two.privacy.max_grad_norm, two.rounds) == auto_schedule(1.5) == (1.0, 10)
    one = from_dict({"task": "churn", "model": {"heads": "separate"}, "privacy": {"epsilon": 3.0}})
    assert (one.privacy.max_grad_norm, one.rounds) == auto_schedule(3.0)
