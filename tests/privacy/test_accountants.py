from __future__ import annotations

import itertools
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import federation.privacy.accountants as accountants_mod
from federation.errors import PrivacyError
from federation.privacy.accountants import (
    Accountant,
    available_accountants,
    DP_RDP_ORDERS,
    calibrate_noise_multiplier,
    get_accountant,
    prv_bounds,
    rdp_epsilon_on_orders,
    register_accountant,
)
from federation.privacy.events import DiscreteGaussian, Gaussian, Laplace, PoissonSampledGaussian

ACCOUNTANTS = available_accountants()


def psg(q=0.02, sigma=1.1, steps=100):
    return PoissonSampledGaussian(sampling_rate=q, noise_multiplier=sigma, steps=steps)


def eps(name, events, delta=1e-5):
    return get_accountant(name).epsilon(events, delta=delta)


def test_registry_holds_two_rdp_two_tight_and_the_tight_maximum():
    assert set(ACCOUNTANTS) >= {"rdp", "dp_rdp", "dp_pld", "prv", "tight"}


def test_unknown_accountant_lists_the_allowed_names():
    with pytest.raises(PrivacyError, match="Unknown accountant 'nope'.*dp_pld, dp_rdp, prv, rdp, tight"):
        get_accountant("nope")


def test_register_refuses_a_duplicate_name(monkeypatch):
    monkeypatch.setattr(accountants_mod, "_REGISTRY", dict(accountants_mod._REGISTRY))

    class Other(Accountant):
        name = "rdp"
        description = "x"
        supported_kinds = frozenset()

        def _epsilon(self, events, delta):
            return 0.0

    with pytest.raises(PrivacyError, match="already registered"):
        register_accountant(Other)


def test_check_names_the_offending_event_before_computing(monkeypatch):
    monkeypatch.setattr(accountants_mod, "_REGISTRY", dict(accountants_mod._REGISTRY))
    computed = []

    @register_accountant
    class GaussianOnly(Accountant):
        name = "gaussian_only"
        description = "test"
        supported_kinds = frozenset({"poisson_sampled_gaussian"})

        def _epsilon(self, events, delta):
            computed.append(events)
            return 1.0

    acc = get_accountant("gaussian_only")
    with pytest.raises(PrivacyError, match=r"cannot account event #1 \(Laplace"):
        acc.epsilon([psg(), Laplace(noise_multiplier=2.0)], delta=1e-5)
    assert computed == []
    assert "gaussian_only" in available_accountants()


# ---- contract tests over every registered accountant


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_no_events_spend_nothing(name):
    assert eps(name, []) == 0.0


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_monotonic_in_steps(name):
    values = [eps(name, [psg(steps=s)]) for s in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_decreasing_in_noise(name):
    values = [eps(name, [psg(sigma=s)]) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_increasing_in_sampling_rate(name):
    values = [eps(name, [psg(q=q)]) for q in (0.001, 0.01, 0.1, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_decreasing_in_delta(name):
    assert eps(name, [psg()], delta=1e-3) < eps(name, [psg()], delta=1e-7)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_two_events_equal_one_event_with_summed_steps(name):
    assert eps(name, [psg(steps=120), psg(steps=80)]) == pytest.approx(eps(name, [psg(steps=200)]), rel=1e-12)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_composition_is_order_free_and_costs_at_least_each_part(name):
    a, b, c = psg(steps=300), psg(q=0.05, sigma=2.0, steps=40), Gaussian(noise_multiplier=6.0, count=2)
    ab = eps(name, [a, b, c])
    assert ab == pytest.approx(eps(name, [c, b, a]), rel=1e-9)
    assert ab > max(eps(name, [a]), eps(name, [b]), eps(name, [c]))


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_gaussian_equals_full_batch_sampled_gaussian(name):
    full = eps(name, [psg(q=1.0, sigma=3.0, steps=4)])
    assert eps(name, [Gaussian(noise_multiplier=3.0, count=4)]) == pytest.approx(full, rel=1e-2)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_laplace_is_bounded_by_pure_dp(name):
    # Laplace with b = 10 is (0.1, 0)-DP; twice composed (0.2, 0)-DP.
    value = eps(name, [Laplace(noise_multiplier=10.0, count=2)])
    # RDP conversions may be slightly looser than pure DP; PRV's upper bound adds its eps_error 0.01
    slack = 0.01 if name in ("prv", "tight") else 0.0
    assert 0.19 < value <= 0.2 * 1.02 + slack


@pytest.mark.parametrize("name", ACCOUNTANTS)
@pytest.mark.parametrize(
    "events, delta, message",
    [
        ([psg()], 0.0, "delta"),
        ([psg()], 1.0, "delta"),
        ([psg()], "1e-5", "delta"),
        ([psg(), (0.01, 1.0, 10)], 1e-5, "event #1"),
        ("psg", 1e-5, "sequence"),
        ([{"kind": "gaussian", "noise_multiplier": 1.0}], 1e-5, "event #0"),
    ],
)
def test_invalid_input_raises(name, events, delta, message):
    with pytest.raises(PrivacyError, match=message):
        get_accountant(name).epsilon(events, delta=delta)


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_delta_is_keyword_only(name):
    with pytest.raises(TypeError):
        get_accountant(name).epsilon([psg()], 1e-5)  # type: ignore[misc]


# ---- golden values (Opacus accountants_test: sigma=1.5, q=0.04, 2250 steps, delta=1e-5 -> RDP 7.3291)

OPACUS_CASE = [PoissonSampledGaussian(sampling_rate=0.04, noise_multiplier=1.5, steps=2250)]
MIXED = [
    PoissonSampledGaussian(sampling_rate=0.01, noise_multiplier=1.1, steps=300),
    PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=0.9, steps=100),
    Gaussian(noise_multiplier=8.0, count=3),
]
SERVER = [Gaussian(noise_multiplier=5.0, count=10)]

GOLDEN = [
    ("rdp", OPACUS_CASE, 1e-5, 7.3291111714386545, 1e-9),
    ("dp_rdp", OPACUS_CASE, 1e-5, 7.329876773834711, 1e-6),  # integer orders only
    ("dp_pld", OPACUS_CASE, 1e-5, 6.769478652067367, 1e-6),
    ("prv", OPACUS_CASE, 1e-5, 6.7791320762541, 1e-9),  # = opacus PRVAccountant (checked below too)
    ("tight", OPACUS_CASE, 1e-5, 6.7791320762541, 1e-9),
    ("rdp", MIXED, 1e-6, 3.1453026645707993, 1e-9),
    ("dp_rdp", MIXED, 1e-6, 3.169053319267336, 1e-6),
    ("dp_pld", MIXED, 1e-6, 2.6158141008482283, 1e-6),
    ("prv", MIXED, 1e-6, 2.625812957013416, 1e-6),
    ("tight", MIXED, 1e-6, 2.625812957013416, 1e-6),
    ("rdp", SERVER, 1e-5, 2.8136532471298397, 1e-9),
    ("dp_rdp", SERVER, 1e-5, 2.814109167845533, 1e-6),
    ("dp_pld", SERVER, 1e-5, 2.594384245355031, 1e-6),
    ("prv", SERVER, 1e-5, 2.604536375535605, 1e-6),  # = opacus PRVAccountant with q=1
    ("tight", SERVER, 1e-5, 2.604536375535605, 1e-6),
]


@pytest.mark.parametrize("name, events, delta, expected, rel", GOLDEN)
def test_golden_values(name, events, delta, expected, rel):
    assert eps(name, events, delta) == pytest.approx(expected, rel=rel)


def test_rdp_warns_like_opacus_when_the_optimal_order_is_extreme():
    with pytest.warns(UserWarning, match="largest alpha"):
        eps("rdp", [psg(q=0.001, sigma=5.0, steps=1)])


def test_opacus_golden_value_to_four_decimals():
    assert round(eps("rdp", OPACUS_CASE), 4) == 7.3291


def test_every_registered_accountant_has_golden_values():
    assert {g[0] for g in GOLDEN} >= set(ACCOUNTANTS)


def _opacus_eps(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_rdp_matches_opacus_rdp_accountant_across_a_grid():
    worst = 0.0
    grid = itertools.product([0.001, 0.04, 1.0], [0.6, 1.5, 5.0], [1, 1000], [1e-5, 1e-7])
    for q, sigma, steps, delta in grid:
        theirs = _opacus_eps([(sigma, q, steps)], delta)
        ours = eps("rdp", [psg(q=q, sigma=sigma, steps=steps)], delta)
        worst = max(worst, abs(ours - theirs) / theirs)
    assert worst < 1e-9


def test_rdp_matches_opacus_on_a_composed_history():
    history = [(1.1, 0.01, 300), (0.9, 0.02, 100), (2.0, 0.5, 7)]
    ours = eps("rdp", [psg(q=q, sigma=s, steps=n) for s, q, n in history])
    assert ours == pytest.approx(_opacus_eps(history, 1e-5), rel=1e-9)


# ---- calibration


@pytest.mark.parametrize("name", ACCOUNTANTS)
def test_calibration_round_trip(name):
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sampling_rate=0.01, steps=1000, accountant=name)
    spent = eps(name, [psg(q=0.01, sigma=sigma, steps=1000)])
    assert 2.0 - 0.01 <= spent <= 2.0


def test_calibration_matches_opacus_get_noise_multiplier():
    ours = calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=0.02, steps=500, accountant="rdp")
    theirs = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.02, steps=500)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_pld_needs_less_noise_than_rdp_for_the_same_target():
    kwargs = dict(target_epsilon=1.0, delta=1e-5, sampling_rate=0.02, steps=500)
    rdp_sigma = calibrate_noise_multiplier(**kwargs, accountant="rdp")
    assert calibrate_noise_multiplier(**kwargs, accountant="dp_pld") < rdp_sigma
    assert calibrate_noise_multiplier(**kwargs) < rdp_sigma  # default: tight


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=math.inf), "target_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(sampling_rate=0.0), "sampling_rate"),
        (dict(steps=0), "steps"),
        (dict(accountant="nope"), "Unknown accountant"),
        (dict(tol=0.0), "tol"),
    ],
)
def test_calibration_validates_inputs(kwargs, message):
    base = dict(target_epsilon=1.0, delta=1e-5, sampling_rate=0.01, steps=100)
    with pytest.raises(PrivacyError, match=message):
        calibrate_noise_multiplier(**{**base, **kwargs})


def test_calibration_is_keyword_only():
    with pytest.raises(TypeError):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 100)  # type: ignore[misc]


@pytest.mark.parametrize("name", ["dp_rdp", "dp_pld"])
def test_cached_sampled_gaussian_path_equals_the_dp_accounting_accountant(name):
    """The per-(q, sigma) cached path gives what composing into dp_accounting's accountant gives."""
    from federation.privacy.accountants import _REGISTRY
    from federation.privacy.events import PoissonSampledGaussian

    events = [PoissonSampledGaussian(sampling_rate=0.03, noise_multiplier=1.3, steps=70),
              PoissonSampledGaussian(sampling_rate=0.05, noise_multiplier=0.9, steps=40)]
    cls = _REGISTRY[name]
    fast = cls()._epsilon_sampled_gaussians(events, 1e-5)
    acc = cls._factory()
    for e in events:
        acc.compose(e.to_dp_accounting())
    assert fast == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


# ---- PRV (port of opacus PRVAccountant), tight, the RDP cross-check and dp_rdp's order grid


def _opacus_prv(history, delta):
    acc = PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("history, delta", [
    ([(1.5, 0.04, 2250)], 1e-5),
    ([(1.0, 128 / 480, 80)], 1e-5),
    ([(1.1, 0.01, 300), (0.9, 0.02, 100)], 1e-6),
    ([(2.0, 0.01, 100)], 1e-5),
])
def test_prv_equals_opacus_prv_accountant(history, delta):
    ours = eps("prv", [psg(q=q, sigma=s, steps=n) for s, q, n in history], delta)
    assert ours == pytest.approx(_opacus_prv(history, delta), rel=1e-9)


@pytest.mark.parametrize("event", [
    psg(q=0.0267, sigma=1.28, steps=750), Gaussian(noise_multiplier=3.0, count=2),
    DiscreteGaussian(noise_multiplier=5.0, count=4), DiscreteGaussian(noise_multiplier=0.8),
    Laplace(noise_multiplier=10.0, count=3),
], ids=lambda e: e.kind)
def test_the_two_tight_accountants_agree_within_the_prv_error_bounds(event):
    lower, estimate, upper = prv_bounds([event], delta=1e-5)
    pld = eps("dp_pld", [event])
    assert lower <= pld <= upper
    assert 0.02 <= upper - lower < 0.03  # eps_error 0.01 each side, plus delta -/+ delta_error
    assert eps("tight", [event]) == max(pld, upper)
    if event.kind != "laplace":  # for Laplace, rdp takes the exact pure-DP composition
        assert eps("tight", [event]) < eps("rdp", [event])


def test_prv_rounds_the_discrete_gaussian_up_never_down():
    """Pessimistic rounding: a coarser PRV mesh can only raise the discrete Gaussian's estimate."""
    from federation.privacy import prv as prv_lib

    ev = [DiscreteGaussian(noise_multiplier=2.0, count=3)]
    fine = prv_lib.prv_epsilon_bounds(ev, 1e-5, l_max=10.0, eps_error=0.001)[1]
    coarse = prv_lib.prv_epsilon_bounds(ev, 1e-5, l_max=10.0, eps_error=0.1)[1]
    assert coarse >= fine > 0
    assert fine == pytest.approx(eps("dp_pld", ev), rel=5e-3)


def test_rdp_implementations_agree_on_the_same_orders():
    events = MIXED + [DiscreteGaussian(noise_multiplier=4.0, count=2)]
    ours = rdp_epsilon_on_orders(events, delta=1e-6, orders=DP_RDP_ORDERS)
    assert ours == pytest.approx(eps("dp_rdp", events, 1e-6), rel=1e-9)


def test_dp_rdp_order_grid_never_fails_to_converge(caplog):
    """dp-accounting's fractional-order series fails at small sigma / large q; its integer grid does not."""
    import logging

    caplog.set_level(logging.WARNING)
    for q, sigma in [(0.27, 0.5), (0.5, 10.0), (0.1, 0.3), (0.9, 0.3)]:
        assert eps("dp_rdp", [psg(q=q, sigma=sigma, steps=10)]) > 0
    assert "failed to converge" not in caplog.text
