"""Seeded generator of raw customer event logs for N partners (business units).

Each customer has a latent engagement level and a latent trend. Daily activity follows a Poisson rate
driven by both, customers may quit (after which they produce no events), and the probability that a
visit converts to a purchase rises with engagement. Churn (no activity in the horizon) and propensity
(a purchase in the horizon) therefore depend on the latent state only through behaviour a partner can
observe before the cutoff: recency, frequency, trend, purchases. Partners look like real data silos: several
small business units and a few large ones (``partner_sizes``), with different base activity, purchase and churn
rates (base rates), channel mix, and shifted behaviour (how strongly engagement and trend drive quitting, and a
regional effect of their own). The shared part of the behaviour is what a small unit gains from federating.

Deterministic for (seed, partner index): partner p's log does not depend on how many partners there are
(beyond the size schedule), and a client generates only its own partner.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

CHANNELS = ("web", "app", "store", "phone")
PLANS = ("basic", "plus", "premium")
REGIONS = ("north", "south", "east", "west")



SYNTHETIC_CUTOFF = "2024-01-01"  # the generator's cutoff and label horizon when data.cutoff / data.horizon_days are unset
SYNTHETIC_HORIZON_DAYS = 90


def synthetic_dates(data_cfg) -> tuple[str, int]:
    """(cutoff, horizon_days) of a synthetic run: the config's when set, else the generator's defaults."""
    return (str(data_cfg.cutoff) if data_cfg.cutoff else SYNTHETIC_CUTOFF,
            int(data_cfg.horizon_days) or SYNTHETIC_HORIZON_DAYS)

@dataclass(frozen=True)
class PartnerProfile:
    partner: int
    n_customers: int
    base_rate: float  # log daily activity rate offset
    purchase_bias: float  # logit offset of a visit converting
    churn_bias: float  # logit offset of quitting
    channel_mix: tuple[float, ...]
    # shifted behaviour: this partner's weights of engagement and trend in quitting, and its regional effects
    churn_engagement: float = 0.7
    churn_trend: float = 0.6
    region_effect: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)


def partner_sizes(partners: int, *, min_customers: int, max_customers: int, seed: int) -> list[int]:
    """A few large partners (about a third, log-spaced from max/2 to max) and several small ones (log-spaced from
    min to 3 x min, at most max/2), shuffled deterministically: the shape of real business units."""
    if partners == 1:
        return [max_customers]
    n_large = max(1, round(0.35 * partners))
    large = np.geomspace(max(min_customers, max_customers / 2), max_customers, n_large)
    small_top = max(min_customers, min(3 * min_customers, max_customers / 2))
    small = np.geomspace(min_customers, small_top, partners - n_large)
    sizes = np.concatenate([small, large]).round().astype(int)
    rng = np.random.default_rng([seed, 7919])
    return [int(s) for s in rng.permutation(sizes)]


def partner_profile(partner: int, n_customers: int, *, seed: int) -> PartnerProfile:
    rng = np.random.default_rng([seed, partner, 1])
    mix = rng.dirichlet(np.array([4.0, 3.0, 2.0, 1.0]) * 2)
    return PartnerProfile(
        partner=partner,
        n_customers=n_customers,
        base_rate=float(rng.normal(-2.9, 0.35)),
        purchase_bias=float(rng.normal(-1.9, 0.4)),
        churn_bias=float(rng.normal(-1.1, 0.6)),
        channel_mix=tuple(float(x) for x in mix),
        churn_engagement=float(0.7 * np.exp(rng.normal(0.0, 0.25))),
        churn_trend=float(0.6 * np.exp(rng.normal(0.0, 0.25))),
        region_effect=tuple(float(x) for x in rng.normal(0.0, 0.4, len(REGIONS))),
    )


def generate_partner(
    profile: PartnerProfile, *, seed: int, cutoff: str = SYNTHETIC_CUTOFF, history_days: int = 365,
    horizon_days: int = SYNTHETIC_HORIZON_DAYS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (events, customers) for one partner.

    events: user_id, timestamp, event_type, amount, channel.
    customers: indexed by user_id: signup_date, plan, region (static attributes).
    """
    rng = np.random.default_rng([seed, profile.partner, 2])
    n = profile.n_customers
    cut = pd.Timestamp(cutoff)
    start = cut - pd.Timedelta(days=history_days)
    total_days = history_days + horizon_days

    engagement = rng.normal(0.0, 1.0, n)
    trend = rng.normal(0.0, 1.0, n)  # per-customer drift of engagement (per half year)
    plan = rng.choice(len(PLANS), n, p=[0.6, 0.3, 0.1])
    engagement = engagement + 0.25 * plan  # plan correlates mildly with engagement
    region = rng.integers(0, len(REGIONS), n)
    # Customers join over the history (some long before it).
    signup_offset = rng.integers(-3 * 365, history_days - 30, n)
    signup = np.maximum(signup_offset, 0)  # first day with possible activity (in the window)
    # Quitting: hazard rises with low engagement and negative trend; quit day uniformly over the
    # last 120 days of history and the horizon, so some quit before the cutoff, some after.
    quit_logit = (profile.churn_bias - profile.churn_engagement * engagement - profile.churn_trend * trend
                  + np.asarray(profile.region_effect)[region] + rng.logistic(0.0, 1.0, n))
    quits = rng.random(n) < 1.0 / (1.0 + np.exp(-quit_logit))
    quit_day = np.where(quits, rng.integers(history_days - 60, total_days, n), total_days + 1)

    # Weekly Poisson counts: rate_i(t) = exp(base + 0.8*engagement + 0.6*trend * (t - cutoff)/182) per day.
    weeks = int(np.ceil(total_days / 7))
    wstart = np.arange(weeks) * 7
    rel = (wstart + 3.5 - history_days) / 182.0
    log_rate = profile.base_rate + 0.8 * engagement[:, None] + 0.6 * trend[:, None] * rel[None, :]
    lam = 7.0 * np.exp(np.minimum(log_rate, 2.0))
    alive = (wstart[None, :] >= signup[:, None]) & (wstart[None, :] < quit_day[:, None])
    counts = rng.poisson(lam * alive)
    cust_idx, week_idx = np.nonzero(counts)
    reps = counts[cust_idx, week_idx]
    cust = np.repeat(cust_idx, reps)
    day = np.repeat(wstart[week_idx], reps) + rng.integers(0, 7, reps.sum())
    keep = (day < quit_day[cust]) & (day < total_days)
    cust, day = cust[keep], day[keep]
    m = len(cust)

    # Event type: purchase probability rises with engagement; support tickets more likely before quitting.
    p_buy = 1.0 / (1.0 + np.exp(-(profile.purchase_bias + 0.7 * engagement[cust] + 0.3 * plan[cust])))
    near_quit = (quit_day[cust] - day) < 45
    p_sup = np.where(near_quit, 0.12, 0.03)
    p_ret = 0.15 * p_buy
    u = rng.random(m)
    etype = np.full(m, "visit", dtype=object)
    etype[u < p_buy] = "purchase"
    etype[(u >= p_buy) & (u < p_buy + p_sup)] = "support_ticket"
    etype[(u >= p_buy + p_sup) & (u < p_buy + p_sup + p_ret)] = "return"
    spend_level = np.exp(3.0 + 0.3 * engagement + 0.4 * plan)
    amount = np.where(etype == "purchase", rng.lognormal(np.log(spend_level[cust]), 0.5), 0.0)
    amount = np.where(etype == "return", rng.lognormal(np.log(spend_level[cust]) - 0.5, 0.5), amount)
    channel = np.array(CHANNELS)[rng.choice(len(CHANNELS), m, p=np.array(profile.channel_mix))]
    seconds = rng.integers(0, 86_400, m)
    timestamp = start + pd.to_timedelta(day, unit="D") + pd.to_timedelta(seconds, unit="s")

    ids = np.array([f"p{profile.partner}-c{i:06d}" for i in range(n)], dtype=object)
    order = np.argsort(timestamp.to_numpy(), kind="stable")
    events = pd.DataFrame(
        {
            "user_id": ids[cust][order],
            "timestamp": timestamp[order],
            "event_type": etype[order],
            "amount": np.round(amount[order], 2),
            "channel": channel[order],
        }
    )
    customers = pd.DataFrame(
        {
            "signup_date": start + pd.to_timedelta(signup_offset, unit="D"),
            "plan": np.array(PLANS)[plan],
            "region": np.array(REGIONS)[region],
        },
        index=pd.Index(ids, name="user_id"),
    )
    return events, customers


def generate_federation(
    partners: int, *, seed: int, min_customers: int = 600, max_customers: int = 6000, **kwargs
) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    sizes = partner_sizes(partners, min_customers=min_customers, max_customers=max_customers, seed=seed)
    return [generate_partner(partner_profile(p, n, seed=seed), seed=seed, **kwargs) for p, n in enumerate(sizes)]
