from __future__ import annotations

import dp_accounting
import pytest

from federation.errors import PrivacyError
from federation.privacy.events import (
    EVENT_KINDS, DiscreteGaussian, Gaussian, Laplace, PoissonSampledGaussian, event_from_dict,
)

EXAMPLES = [
    PoissonSampledGaussian(sampling_rate=0.01, noise_multiplier=1.2, steps=100),
    Gaussian(noise_multiplier=3.0, count=2),
    Laplace(noise_multiplier=10.0),
    DiscreteGaussian(noise_multiplier=20.0, count=3),
]


def test_every_kind_has_an_example():
    assert {type(e) for e in EXAMPLES} == set(EVENT_KINDS.values())


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_dict_round_trip_through_closed_table(event):
    d = event.to_dict()
    assert d["kind"] == event.kind
    assert event_from_dict(d) == event


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_to_dp_accounting_is_self_composed(event):
    dp = event.to_dp_accounting()
    assert isinstance(dp, dp_accounting.SelfComposedDpEvent)
    assert dp.count == event.count


def test_poisson_sampled_gaussian_dp_event_shape():
    dp = EXAMPLES[0].to_dp_accounting()
    assert isinstance(dp.event, dp_accounting.PoissonSampledDpEvent)
    assert dp.event.sampling_probability == 0.01
    assert dp.event.event == dp_accounting.GaussianDpEvent(1.2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sampling_rate=0.0, noise_multiplier=1.0, steps=1), "sampling_rate"),
        (dict(sampling_rate=1.5, noise_multiplier=1.0, steps=1), "sampling_rate"),
        (dict(sampling_rate=float("nan"), noise_multiplier=1.0, steps=1), "sampling_rate"),
        (dict(sampling_rate=0.1, noise_multiplier=0.0, steps=1), "noise_multiplier"),
        (dict(sampling_rate=0.1, noise_multiplier=-1.0, steps=1), "noise_multiplier"),
        (dict(sampling_rate=0.1, noise_multiplier=float("inf"), steps=1), "noise_multiplier"),
        (dict(sampling_rate=0.1, noise_multiplier=1.0, steps=0), "steps"),
        (dict(sampling_rate=0.1, noise_multiplier=1.0, steps=2.0), "steps"),
        (dict(sampling_rate=0.1, noise_multiplier=1.0, steps=True), "steps"),
        (dict(sampling_rate="0.1", noise_multiplier=1.0, steps=1), "sampling_rate"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(PrivacyError, match=rf"PoissonSampledGaussian\.{field}"):
        PoissonSampledGaussian(**kwargs)


def test_keyword_only():
    with pytest.raises(TypeError):
        PoissonSampledGaussian(0.1, 1.0, 10)  # type: ignore[misc]


def test_frozen():
    with pytest.raises(AttributeError):
        EXAMPLES[0].steps = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "os.system", "noise_multiplier": 1.0}, "Unknown mechanism kind"),
        ({"noise_multiplier": 1.0}, "Unknown mechanism kind"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "sensitivity": 2.0}, "unknown field"),
        ({"kind": "poisson_sampled_gaussian", "noise_multiplier": 1.0, "steps": 3}, "lacks field"),
        ({"kind": "gaussian", "noise_multiplier": 0}, "noise_multiplier"),
        (["gaussian"], "must be a mapping"),
    ],
)
def test_loader_refuses_what_it_does_not_understand(data, message):
    with pytest.raises(PrivacyError, match=message):
        event_from_dict(data)


def test_with_count_and_composition_key():
    e = EXAMPLES[0]
    assert e.with_count(7).steps == 7
    assert e.with_count(7).composition_key() == e.composition_key()
    assert Gaussian(noise_multiplier=3.0).composition_key() != Laplace(noise_multiplier=3.0).composition_key()
