"""Cumulative accounting across rounds, against Opacus's accountant and its published golden value."""
import pytest
from opacus.accountants import RDPAccountant

from clients.privacy_state import PrivacyState, _rdp_epsilon, calibrate_noise
from federation.errors import BudgetExceededError


def test_golden_opacus_rdp_value():
    # opacus/tests/accountants_test.py: sigma=1.5, q=0.04, 2250 steps, delta=1e-5 -> 7.3291
    assert _rdp_epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.3291, abs=1e-3)


def test_history_split_into_rounds_equals_one_composition():
    whole = _rdp_epsilon([(1.1, 0.02, 500)], 1e-5)
    rounds = _rdp_epsilon([(1.1, 0.02, 100)] * 5, 1e-5)
    assert rounds == pytest.approx(whole, rel=1e-12)


def test_epsilon_is_cumulative_and_meets_target_exactly_at_the_end():
    st = PrivacyState.plan(target_epsilon=2.0, delta=1e-5, sample_rate=0.05, steps_per_round=20, rounds=4, max_grad_norm=1.0)
    eps = []
    for _ in range(4):
        st.check_next_round()
        st = st.after_round()
        eps.append(st.epsilon())
    assert eps == sorted(eps) and eps[0] > 0
    assert 1.95 <= eps[-1] <= 2.0
    acc = RDPAccountant()
    acc.history = [(st.noise_multiplier, 0.05, 80)]
    assert eps[-1] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_round_beyond_target_is_refused_with_numbers():
    st = PrivacyState.plan(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps_per_round=10, rounds=2, max_grad_norm=1.0)
    st = st.after_round().after_round()
    with pytest.raises(BudgetExceededError, match=r"round 3 would raise epsilon \(training \+ reserved evaluation\) to 1\.\d+ > target 1\.0000"):
        st.check_next_round()


def test_state_round_trips_through_json():
    st = PrivacyState.plan(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps_per_round=100, rounds=3, max_grad_norm=1.0)
    st = st.after_round()
    assert PrivacyState.from_json(st.to_json()) == st


def test_calibration_more_noise_for_smaller_epsilon():
    a = calibrate_noise(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=1000)
    b = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.01, steps=1000)
    assert a > b > 0
