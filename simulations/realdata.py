"""Real datasets as federations: contract (conf/contracts/) + partitioning into partners.

Natural partitions (the default, ``data.partitioner=natural``) follow an attribute a real split would
follow, and so FIX the number of partners: ``num_natural_partners(data_cfg)`` returns it and the
simulation uses it instead of ``partners`` (to choose any number, use ``data.partitioner=dirichlet``
(label + size skew, ``data.dirichlet_alpha``) or ``iid``, for which it returns None).

  online_retail  country: the UK (~90% of customers) split into 3 partners by a stable hash of the
                 customer id + one international partner (every other country); attribute = the
                 customer's last country before the cutoff.
  bank_marketing job: manual & services | admin | technical & management & own business |
                 outside the workforce (retired, student, unemployed, unknown).
  telco_churn    payment (default): the 4 payment methods; contract: the 3 contract types.
  iranian_churn  age: age groups {1,2} | {3} | {4,5}; tariff: not offered (229 rows in plan 2).

Entry point: ``load_partner_features(data_cfg, partition_id=, num_partitions=, seed=)``. The validated
file is parsed once per process (lru_cache keyed on the file path and the contract); each call encodes
only its partner's customers, with the same declared encoding everywhere. Deterministic for the seed.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from federation.contract import DataContract, build_features, contract_problems, load_contract, resolve_data_path
from federation.errors import ConfigError, DataValidationError, Problem
from federation.features import FeatureSet, event_labels, static_from_events
from federation.validation import PRIVACY_WHY, Validated, read_validated


@dataclass(frozen=True)
class Group:
    name: str
    values: tuple[str, ...] = ()  # attribute values of this group; () = every value no other group names
    parts: int = 1  # split further into this many partners by a stable hash of the customer id


@dataclass(frozen=True)
class NaturalScheme:
    column: str  # source column (events: the static attribute, last value before the cutoff)
    groups: tuple[Group, ...]

    @property
    def partners(self) -> int:
        return sum(g.parts for g in self.groups)


SCHEMES: dict[str, dict[str, NaturalScheme]] = {
    "online_retail": {
        "country": NaturalScheme("Country", (Group("uk", ("United Kingdom",), parts=3), Group("international"))),
    },
    "bank_marketing": {
        "job": NaturalScheme("job", (
            Group("manual_services", ("blue-collar", "services", "housemaid")),
            Group("admin", ("admin.",)),
            Group("technical_management", ("technician", "management", "entrepreneur", "self-employed")),
            Group("outside_workforce", ()),
        )),
    },
    "telco_churn": {
        "payment": NaturalScheme("PaymentMethod", (
            Group("electronic_check", ("Electronic check",)), Group("mailed_check", ("Mailed check",)),
            Group("bank_transfer", ("Bank transfer (automatic)",)), Group("credit_card", ("Credit card (automatic)",)),
        )),
        "contract": NaturalScheme("Contract", (
            Group("month_to_month", ("Month-to-month",)), Group("one_year", ("One year",)), Group("two_year", ("Two year",)),
        )),
    },
    "iranian_churn": {
        "age": NaturalScheme("Age Group", (Group("young", ("1", "2")), Group("middle", ("3",)), Group("older", ()))),
    },
}


def _cfg(data_cfg: Any, key: str, default: Any = "") -> Any:
    return data_cfg.get(key, default) if isinstance(data_cfg, dict) else getattr(data_cfg, key, default)


def contract_for(data_cfg: Any) -> DataContract:
    """The contract a data config names, with the config's overrides (file path; cutoff/horizon for events)."""
    if not _cfg(data_cfg, "contract"):
        raise ConfigError(f"data.contract is empty for data.name={_cfg(data_cfg, 'name')!r}; point it at conf/contracts/")
    c = load_contract(_cfg(data_cfg, "contract"))
    if _cfg(data_cfg, "path"):
        c = c.replace(source=dataclasses.replace(c.source, files=(str(_cfg(data_cfg, "path")),)))
    if c.kind == "events":
        cut, hor = _cfg(data_cfg, "cutoff"), _cfg(data_cfg, "horizon_days", 0)
        c = c.with_events(cutoff=str(cut) if cut else c.events.cutoff, horizon_days=int(hor) or c.events.horizon_days)
        problems = [x.replace("events.cutoff", "data.cutoff (or the contract's events.cutoff)")
                    for x in contract_problems(c)]
        if problems:
            raise ConfigError(f"data={_cfg(data_cfg, 'name')} with contract {c.name!r}:\n"
                              + "\n".join(f"  - {x}" for x in problems))
    return c


MAX_COLUMN_PARTNERS = 16


def _contract_columns(contract: DataContract) -> list[str]:
    feats = contract.features if contract.kind == "table" else contract.static
    return [f.column for f in feats]


@lru_cache(maxsize=8)
def column_scheme(contract: DataContract, column: str) -> NaturalScheme:
    """One partner per value of a contract column (tables: the column; event logs: a static attribute, the
    customer's last value before the cutoff), most frequent value first: how a data team simulates silos that
    a column of its own table defines (region, brand, business unit). Values beyond MAX_COLUMN_PARTNERS are refused."""
    frame = validated_frame(contract).frame
    if contract.kind == "events":
        ids = frame["__cid"].unique()
        values = static_from_events(frame, [column], cutoff=contract.events.cutoff, schema=contract.schema())[column]
        values = values.reindex(ids)
    else:
        values = frame[column]
    counts = values.astype("str").str.strip().value_counts()
    if len(counts) > MAX_COLUMN_PARTNERS:
        raise ConfigError(f"data.partition_by={column!r} has {len(counts)} distinct values; at most {MAX_COLUMN_PARTNERS} "
                          "partners can come from one column (use a coarser column, or data.partitioner=dirichlet)")
    return NaturalScheme(column, tuple(Group(str(v), (str(v),)) for v in counts.index))


def scheme_for(data_cfg: Any, contract: DataContract) -> NaturalScheme:
    """The natural partitioning: a bundled dataset's named scheme, or ``data.partition_by=<column>`` of any contract."""
    schemes = SCHEMES.get(contract.name, {})
    name = _cfg(data_cfg, "partition_by") or (next(iter(schemes)) if schemes else "")
    if name in schemes:
        return schemes[name]
    if name in _contract_columns(contract):
        return column_scheme(contract, name)
    cols = ", ".join(_contract_columns(contract))
    if not name:
        raise ConfigError(f"dataset {contract.name!r} has no built-in natural partitioning: name the column whose values "
                          f"define the partners with data.partition_by=<column> (one of: {cols}), or use "
                          "data.partitioner=dirichlet or iid")
    known = ", ".join([*schemes, *_contract_columns(contract)])
    raise ConfigError(f"data.partition_by={name!r} is neither a scheme of {contract.name} nor a column of its contract; "
                      f"use one of: {known}")


def num_natural_partners(data_cfg: Any) -> int | None:
    """Number of partners the natural partitioning implies; None when any number works."""
    if _cfg(data_cfg, "kind") not in ("events", "table") or _cfg(data_cfg, "partitioner", "natural") != "natural":
        return None
    c = contract_for(data_cfg)
    return scheme_for(data_cfg, c).partners


# ---------------------------------------------------------------------------- partitioners
def _stable_hash(ids: np.ndarray) -> np.ndarray:
    return np.array([zlib.crc32(str(x).encode()) for x in ids], dtype=np.int64)


def natural_assignment(values: pd.Series, ids: np.ndarray, scheme: NaturalScheme) -> np.ndarray:
    """Partner index per row: its group's offset (+ a stable id hash for split groups)."""
    text = values.astype("str").str.strip().to_numpy(dtype=object)
    out = np.full(len(text), -1, dtype=np.int64)
    offset, rest = 0, None
    offsets = []
    for g in scheme.groups:
        offsets.append(offset)
        if not g.values:
            rest = (offset, g.parts)
        offset += g.parts
    for g, off in zip(scheme.groups, offsets):
        if g.values:
            hit = np.isin(text, list(g.values))
            out[hit] = off if g.parts == 1 else off + _stable_hash(ids[hit]) % g.parts
    if rest is not None:
        miss = out < 0
        out[miss] = rest[0] if rest[1] == 1 else rest[0] + _stable_hash(ids[miss]) % rest[1]
    return out


def dirichlet_assignment(labels: np.ndarray, num_partitions: int, *, alpha: float, seed: int,
                         min_size: int = 10, max_tries: int = 100, min_per_class: int = 0) -> np.ndarray:
    """Label- and size-skewed split of any table: per class, partner shares ~ Dirichlet(alpha).

    Redraws (deterministically) until every partner has at least min(min_size, n // (2K)) rows and at least
    min(min_per_class, class count // (2K)) rows of every class.
    """
    labels = np.asarray(labels)
    n = len(labels)
    need = min(min_size, n // (2 * num_partitions))
    classes = np.unique(labels)
    need_cls = {c: min(min_per_class, int((labels == c).sum()) // (2 * num_partitions)) for c in classes}
    rng = np.random.default_rng([seed, 31337])
    for _ in range(max_tries):
        out = np.empty(n, dtype=np.int64)
        for cls in np.unique(labels):
            idx = np.flatnonzero(labels == cls)
            idx = idx[rng.permutation(len(idx))]
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for p, part in enumerate(np.split(idx, cuts)):
                out[part] = p
        if np.bincount(out, minlength=num_partitions).min() >= need and all(
                np.bincount(out[labels == c], minlength=num_partitions).min() >= k for c, k in need_cls.items()):
            return out
    raise ConfigError(f"dirichlet partition with alpha={alpha} could not give each of {num_partitions} partners "
                      f"{need} rows and {min_per_class} of each class in {max_tries} draws; raise data.dirichlet_alpha or use fewer partners")


def iid_assignment(n: int, num_partitions: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 4242])
    return rng.permutation(np.arange(n) % num_partitions)


# ---------------------------------------------------------------------------- cached loading
@lru_cache(maxsize=4)
def _validated(path: str, contract: DataContract) -> Validated:
    return read_validated(contract, path)


def validated_frame(contract: DataContract) -> Validated:
    return _validated(str(resolve_data_path(contract.source.files[0])), contract)


@lru_cache(maxsize=8)
def _assignment(contract: DataContract, partitioner: str, scheme_name: str, num_partitions: int, seed: int,
                alpha: float, min_positives: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids, partner per unit); units are customers (events, tables with ids) or rows."""
    v = validated_frame(contract)
    frame = v.frame
    if contract.kind == "events":
        cut = pd.Timestamp(contract.events.cutoff)
        sch = contract.schema()
        ts = frame["__ts"]
        active = (ts < cut) & (ts >= cut - pd.Timedelta(days=contract.events.lookback_days)) & \
            frame["__event_type"].astype("str").isin(list(contract.events.activity))
        ids = np.sort(frame.loc[active.to_numpy(dtype=bool), "__cid"].unique().astype(object))
    else:
        ids = frame["__cid"].to_numpy(dtype=object) if "__cid" in frame else np.arange(len(frame))
    if partitioner == "natural":
        scheme = SCHEMES.get(contract.name, {}).get(scheme_name) or column_scheme(contract, scheme_name)
        if contract.kind == "events":
            static = static_from_events(frame, [scheme.column], cutoff=contract.events.cutoff, schema=sch)
            values = static[scheme.column].reindex(ids)
        else:
            values = frame[scheme.column]
        part = natural_assignment(values.reset_index(drop=True), np.asarray(ids), scheme)
    elif partitioner == "dirichlet":
        if contract.kind == "events":
            labels = event_labels(frame, ids, cutoff=contract.events.cutoff, horizon_days=contract.events.horizon_days,
                                  schema=contract.schema())["churn"]
        else:
            labels = frame["__label"].to_numpy()
        part = dirichlet_assignment(labels, num_partitions, alpha=alpha, seed=seed, min_size=contract.min_customers,
                                    min_per_class=min_positives)
    else:
        part = iid_assignment(len(ids), num_partitions, seed=seed)
    return np.asarray(ids), part


def load_partner_features(data_cfg: Any, *, partition_id: int, num_partitions: int, seed: int) -> FeatureSet:
    """One partner's encoded features and labels (events: y keys churn + propensity; tables: the contract's task).

    Raises ConfigError for an impossible partitioning, DataValidationError when the data breaks the
    contract or the partner has fewer customers than the contract's min_customers.
    """
    c = contract_for(data_cfg)
    partitioner = _cfg(data_cfg, "partitioner", "natural") or "natural"
    scheme_name = ""
    if partitioner == "natural":
        scheme = scheme_for(data_cfg, c)
        scheme_name = _cfg(data_cfg, "partition_by") or next(iter(SCHEMES.get(c.name, {})), "")
        if num_partitions != scheme.partners:
            raise ConfigError(
                f"data={c.name} with data.partitioner=natural has {scheme.partners} partners "
                f"({', '.join(g.name + (f' x{g.parts}' if g.parts > 1 else '') for g in scheme.groups)}), "
                f"not {num_partitions}; set partners={scheme.partners} or use data.partitioner=dirichlet")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition_id={partition_id} outside [0, {num_partitions})")
    ids, part = _assignment(c, partitioner, scheme_name, int(num_partitions), int(seed),
                            float(_cfg(data_cfg, "dirichlet_alpha", 0.5)), int(_cfg(data_cfg, "min_positives", 10)))
    mine = ids[part == partition_id]
    frame = validated_frame(c).frame
    if c.kind == "events" or "__cid" in frame:
        sub = frame.loc[frame["__cid"].isin(pd.Index(mine)).to_numpy(dtype=bool)]
    else:
        sub = frame.iloc[np.sort(mine)]
    fs = build_features(sub, c)
    if len(fs) < c.min_customers:
        raise DataValidationError(
            [Problem(f"partner {partition_id} of {num_partitions} has {len(fs)} customers, fewer than the contract's "
                     f"min_customers={c.min_customers}: {PRIVACY_WHY}. "
                     + ("Coarsen the partition column in the export (e.g. countries into regions), or use "
                        "data.partitioner=dirichlet or iid" if partitioner == "natural"
                        else "Use fewer partners or a larger data.dirichlet_alpha"),
                     code="too_few_customers", count=len(fs))],
            source=f"{c.name} partner {partition_id}")
    _check_positives(fs, int(_cfg(data_cfg, "min_positives", 10)), partition_id=partition_id,
                     num_partitions=num_partitions, name=c.name, natural=partitioner == "natural")
    return fs


def _check_positives(fs: FeatureSet, need: int, *, partition_id: int, num_partitions: int, name: str,
                     natural: bool = False) -> None:
    """A simulated partner with a handful of positives (or negatives) has no local model and no meaningful DP
    evaluation: refuse the split, naming the counts (the data team holds all of this data; nothing leaves a node)."""
    problems = []
    for task, y in fs.y.items():
        pos = int(np.asarray(y).sum())
        for what, k in (("positives", pos), ("negatives", len(y) - pos)):
            if k < need:
                problems.append(Problem(
                    f"partner {partition_id} of {num_partitions} has {k} {task} {what} (of {len(y)} customers), fewer "
                    f"than data.min_positives={need}; "
                    + ("coarsen the partition column in the export, use another data.partition_by or "
                       "data.partitioner=dirichlet or iid" if natural else
                       "use fewer partners or a larger data.dirichlet_alpha")
                    + ", or data.min_positives=0 to accept it", code="too_few_positives", count=k))
    if problems:
        raise DataValidationError(problems, source=f"{name} partner {partition_id}")


def natural_partner_names(data_cfg: Any) -> list[str] | None:
    """Names of the natural partners in partition order (e.g. telco's payment methods; split groups get -1, -2,
    ...); None for dirichlet/iid partitioning, whose partners have no natural name."""
    if _cfg(data_cfg, "partitioner", "natural") != "natural":
        return None
    scheme = scheme_for(data_cfg, contract_for(data_cfg))
    return [g.name if g.parts == 1 else f"{g.name}-{k + 1}" for g in scheme.groups for k in range(g.parts)]
