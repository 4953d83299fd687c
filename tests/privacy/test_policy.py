from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from federation.errors import BudgetExceededError, ConfigError, PrivacyError
from federation.privacy import (
    Ledger,
    Period,
    PoissonSampledGaussian,
    PolicyError,
    PolicyViolationError,
    calibrate_noise_multiplier,
    check_round,
    check_run,
    load_policy,
    policy_from_mapping,
    verify,
)
from federation.privacy.accountants import get_accountant

from .conftest import T0, append_round

GOOD = {
    "privacy_unit": "customer",
    "max_epsilon": 1.0,
    "period": "calendar-month",
    "delta": 1e-5,
    "min_noise_multiplier": 0.5,
    "max_rounds": 20,
    "allowed_accountants": ["rdp", "dp_pld"],
}


def policy(**changes):
    return policy_from_mapping({**GOOD, **changes})


def test_load_policy_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "privacy_unit: customer\nmax_epsilon: 1.0\nperiod: calendar-month\ndelta: 1e-5\n"
        "min_noise_multiplier: 0.5\nmax_rounds: 20\nallowed_accountants: [rdp, dp_pld]\n"
    )
    p = load_policy(path)
    assert p.delta == 1e-5  # YAML 1.1 reads "1e-5" as a string; accepted as a number
    assert p.period == Period("calendar-month")
    assert p.allowed_accountants == ("rdp", "dp_pld")
    assert policy_from_mapping(p.to_dict()) == p


def test_every_problem_is_reported_once_naming_its_key():
    bad = {**GOOD, "max_epsilion": 2, "delta": 2, "period": "fortnight", "allowed_accountants": ["rdp", "nope"],
           "max_rounds": 0, "privacy_unit": "row"}
    del bad["min_noise_multiplier"]
    with pytest.raises(PolicyError) as info:
        policy_from_mapping(bad, source="policy.yaml")
    msg = str(info.value)
    assert msg.startswith("7 problem(s) in policy.yaml")
    for key in ("max_epsilion: unknown key", "delta:", "period:", "allowed_accountants: unknown accountant(s) ['nope']",
                "max_rounds:", "privacy_unit:", "min_noise_multiplier: required"):
        assert key in msg
    assert isinstance(info.value, ConfigError) and isinstance(info.value, PrivacyError)


def test_policy_file_errors(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "p.yaml").write_text("- a list\n")
    with pytest.raises(PolicyError, match="mapping"):
        load_policy(tmp_path / "p.yaml")


@pytest.mark.parametrize(
    "value, at, start, end",
    [
        ("calendar-month", datetime(2025, 12, 31, 23, tzinfo=timezone.utc),
         datetime(2025, 12, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, tzinfo=timezone.utc)),
        ("calendar-year", datetime(2025, 6, 3, tzinfo=timezone.utc),
         datetime(2025, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 1, tzinfo=timezone.utc)),
        (30, datetime(2025, 6, 3, tzinfo=timezone.utc), datetime(2025, 5, 4, tzinfo=timezone.utc), None),
        ("7d", datetime(2025, 6, 8, tzinfo=timezone.utc), datetime(2025, 6, 1, tzinfo=timezone.utc), None),
        ("all-time", datetime(2025, 6, 3, tzinfo=timezone.utc), None, None),
    ],
)
def test_period_windows(value, at, start, end):
    assert Period.parse(value).window(at) == (start, end)


def test_period_contains_is_utc_and_half_open():
    month = Period.parse("calendar-month")
    at = datetime(2025, 3, 15, tzinfo=timezone.utc)
    assert month.contains(datetime(2025, 3, 1, tzinfo=timezone.utc), at=at)
    assert not month.contains(datetime(2025, 4, 1, tzinfo=timezone.utc), at=at)
    # 2025-04-01 00:30 in UTC+2 is still March in UTC
    assert month.contains(datetime(2025, 4, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))), at=at)
    with pytest.raises(PrivacyError, match="timezone"):
        month.contains(datetime(2025, 3, 2), at=at)


ROUND = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=1.0, steps=50)


def test_check_run_allows_a_run_within_budget():
    run = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=3.0, steps=100)
    check = check_run(policy(), spent_events=[], planned_events=[run], planned_rounds=2)
    assert check.total_epsilon <= 1.0
    assert check.total_epsilon == max(get_accountant(a).epsilon([run], delta=1e-5) for a in ("rdp", "dp_pld"))
    assert check.accountant == "rdp"  # the most conservative allowed accountant is enforced


def test_check_run_refuses_with_the_numbers():
    with pytest.raises(BudgetExceededError) as info:
        check_run(policy(), spent_events=[ROUND], planned_events=[ROUND] * 3, planned_rounds=3)
    msg = str(info.value)
    spent = get_accountant("rdp").epsilon([ROUND], delta=1e-5)
    planned = get_accountant("rdp").epsilon([ROUND] * 3, delta=1e-5)
    total = get_accountant("rdp").epsilon([ROUND] * 4, delta=1e-5)
    assert f"already spent {spent:.4f}" in msg
    assert f"planned {planned:.4f}" in msg
    assert f"epsilon {total:.4f}" in msg
    assert "limit of 1 at delta=1e-05" in msg


def test_policy_rules_other_than_budget():
    weak = PoissonSampledGaussian(sampling_rate=0.001, noise_multiplier=0.4, steps=1)
    with pytest.raises(PolicyViolationError, match="min_noise_multiplier 0.5"):
        check_run(policy(max_epsilon=1000), spent_events=[], planned_events=[weak], planned_rounds=1)
    with pytest.raises(BudgetExceededError, match="also: planned event #0"):  # both problems are reported
        check_run(policy(), spent_events=[], planned_events=[weak], planned_rounds=1)
    tiny = PoissonSampledGaussian(sampling_rate=0.001, noise_multiplier=2.0, steps=1)
    with pytest.raises(PolicyViolationError, match="max_rounds 20"):
        check_run(policy(), spent_events=[], planned_events=[tiny], planned_rounds=21)
    with pytest.raises(PolicyViolationError, match="round 21 > policy max_rounds"):
        check_round(policy(), spent_events=[], round_event=tiny, round_number=21)
    with pytest.raises(PolicyViolationError, match="privacy unit 'partner'"):
        check_run(policy(), spent_events=[], planned_events=[tiny], planned_rounds=1, privacy_unit="partner")
    with pytest.raises(PrivacyError, match="planned_rounds"):
        check_run(policy(), spent_events=[], planned_events=[tiny], planned_rounds=0)


def test_a_run_is_stopped_before_exceeding_and_the_next_run_is_refused(tmp_path, node_key):
    """Issue 4 'done when': epsilon=1 per month; rounds stop before the budget is exceeded, the partner
    records a refusal, and a second run in the same month is refused before it touches data."""
    pol = policy(max_epsilon=1.0)
    path = tmp_path / "ledger.db"
    # a run calibrated for epsilon 1.0 over 4 rounds, but configured for 8 rounds
    sigma = calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=0.02, steps=4 * 50,
                                       accountant="rdp")  # the policy enforces max(rdp, dp_pld) = rdp
    round_event = PoissonSampledGaussian(sampling_rate=0.02, noise_multiplier=sigma, steps=50)
    released = 0
    with Ledger.open(path, signing_key=node_key) as ledger:
        t = T0
        ledger.append(kind="run_start", partner="acme", run_id="r1", timestamp=t)
        for rnd in range(1, 9):
            t += timedelta(minutes=5)
            spent = ledger.events(partner="acme", period=pol.period, at=t)
            try:
                check_round(pol, spent_events=spent, round_event=round_event, round_number=rnd)
            except BudgetExceededError as exc:
                ledger.append(kind="refusal", partner="acme", run_id="r1", round=rnd, timestamp=t,
                              extra={"reason": str(exc)})
                break
            append_round(ledger, run_id="r1", rnd=rnd, when=t, event=round_event)
            released += 1
        assert released == 4
        total = max(ledger.spent(partner="acme", period=pol.period, accountant=a, delta=1e-5, at=t)
                    for a in pol.allowed_accountants)
        assert 0.95 < total <= 1.0
        with pytest.raises(BudgetExceededError, match="run refused"):
            check_run(pol, spent_events=ledger.events(partner="acme", period=pol.period, at=t),
                      planned_events=[round_event], planned_rounds=1)
        # next month the budget is available again
        next_month = datetime(2025, 4, 1, 0, 1, tzinfo=timezone.utc)
        check_run(pol, spent_events=ledger.events(partner="acme", period=pol.period, at=next_month),
                  planned_events=[round_event] * 4, planned_rounds=4)
    assert verify(path, str(node_key) + ".pub").entries == 1 + released + 1


# ---- default policy, lifetime cap, record only

from federation.privacy.policy import default_policy, resolve_policy  # noqa: E402


def test_no_policy_file_means_the_default_policy_never_record_only():
    pol = resolve_policy(None)
    assert pol == default_policy() and resolve_policy("") == pol
    assert not pol.record_only
    assert pol.lifetime_max_epsilon == 10.0 and pol.max_epsilon == 5.0 and pol.period == Period("calendar-month")
    assert pol.allowed_accountants == ("tight",)


def test_the_lifetime_cap_refuses_what_each_month_would_allow():
    """Twelve months of 4.5 each fit every monthly cap of 5, but the lifetime cap of 10 stops them."""
    pol = default_policy()
    sigma = calibrate_noise_multiplier(target_epsilon=4.5, delta=1e-5, sampling_rate=0.05, steps=200)
    month = PoissonSampledGaussian(sampling_rate=0.05, noise_multiplier=sigma, steps=200)
    history: list = []
    allowed = 0
    for _ in range(12):
        try:
            check_run(pol, spent_events=[], planned_events=[month], planned_rounds=1, lifetime_events=history)
        except BudgetExceededError as exc:
            assert "lifetime limit of 10" in str(exc)
            break
        history.append(month)
        allowed += 1
    assert 1 <= allowed < 12
    assert get_accountant("tight").epsilon(history, delta=1e-5) <= 10.0
    assert get_accountant("tight").epsilon(history + [month], delta=1e-5) > 10.0


def test_a_lifetime_cap_without_the_lifetime_spend_fails_closed():
    tiny = PoissonSampledGaussian(sampling_rate=0.01, noise_multiplier=5.0, steps=1)
    with pytest.raises(PrivacyError, match="lifetime cap"):
        check_round(default_policy(), spent_events=[], round_event=tiny, round_number=1)


def test_record_only_must_be_explicit_and_enforces_nothing():
    pol = policy_from_mapping({"record_only": True}, source="ro.yaml")
    assert pol.record_only and pol.source == "ro.yaml"
    huge = PoissonSampledGaussian(sampling_rate=1.0, noise_multiplier=0.01, steps=1000)
    assert check_run(pol, spent_events=[], planned_events=[huge], planned_rounds=1).record_only
    assert policy_from_mapping(pol.to_dict()) == pol
    with pytest.raises(PolicyError, match="record_only: must be true or false"):
        policy_from_mapping({**GOOD, "record_only": "yes"})
    with pytest.raises(PolicyError, match="lifetime_max_epsilon: 0.5 is below"):
        policy_from_mapping({**GOOD, "lifetime_max_epsilon": 0.5})
