"""Everything a simulation checks in the driver BEFORE Ray starts: the contract, the shared data file, and every
partner's own data (features, labels, the node's per-partner checks), all problems collected into one report.

``preflight(cfg, loader=, split_key=)`` prepares each partner exactly as its simulated node will (the loader's
encrypted cache then serves the nodes), returns their names and sizes, or raises ``PreflightError`` whose text
is the whole report: what failed, for which partners, and what to do. Nothing is written on failure.
"""
from __future__ import annotations

from dataclasses import dataclass

from federation.config import FedpropConfig
from federation.errors import ConfigError, DataValidationError, FedpropError


class PreflightError(FedpropError):
    """A simulation was refused before anything started; the message is the complete report."""


@dataclass(frozen=True)
class PartnerInfo:
    index: int
    name: str
    n_train: int
    n_test: int


def partner_names(cfg: FedpropConfig) -> list[str]:
    """Human names of the simulated partners: a real dataset's natural groups (telco: payment methods), else
    ``partner-<i>``."""
    if cfg.data.kind == "synthetic":
        return [f"partner-{i}" for i in range(cfg.partners)]
    from simulations.realdata import natural_partner_names

    names = natural_partner_names(cfg.data)
    return names if names and len(names) == cfg.partners else [f"partner-{i}" for i in range(cfg.partners)]


def _ranges(idx: list[int]) -> str:
    return ", ".join(str(i) for i in idx) if len(idx) < 4 else f"{idx[0]}-{idx[-1]}"


def preflight(cfg: FedpropConfig, *, loader, split_key: bytes) -> list[PartnerInfo]:
    from clients.node import load_partner
    from federation.models import federations

    names = partner_names(cfg)
    if cfg.data.kind != "synthetic":  # one shared file: validate it once, not once per partner
        from simulations.realdata import contract_for, validated_frame

        try:
            validated_frame(contract_for(cfg.data))
        except (DataValidationError, ConfigError) as exc:
            raise PreflightError(_report([(list(range(cfg.partners)), exc)], names, cfg, shared=True)) from None
    failures: dict[str, tuple[list[int], BaseException]] = {}
    out: list[PartnerInfo] = []
    for i in range(cfg.partners):
        node_config = {"partition-id": i, "num-partitions": cfg.partners}
        try:
            for heads in federations(cfg.task, cfg.model.heads):
                data = load_partner(cfg, node_config=node_config, loader=loader, heads_key=",".join(heads),
                                    split_key=split_key)
            out.append(PartnerInfo(i, names[i], int(data.n_train), int(data.n_test)))
        except (FedpropError, ValueError, KeyError, OSError) as exc:  # grouped by kind: one entry per cause
            failures.setdefault(_kind(exc), ([], exc))[0].append(i)
    if failures:
        raise PreflightError(_report(list(failures.values()), names, cfg))
    return out


def _kind(exc: BaseException) -> tuple:
    if isinstance(exc, DataValidationError):
        return (type(exc).__name__, tuple(getattr(p, "code", "") for p in exc.problems))
    return (type(exc).__name__, str(exc) if not isinstance(exc, FedpropError) else type(exc).__name__ + str(exc)[:40])


def _report(failures: list[tuple[list[int], BaseException]], names: list[str], cfg: FedpropConfig, *,
            shared: bool = False) -> str:
    n = sum((1 if shared else len(idx)) * (len(e.problems) if isinstance(e, DataValidationError) else 1)
            for idx, e in failures)
    lines = [f"refused before starting (data={cfg.data.name}): {n} problem(s); no partner, Ray worker or run "
             "folder was started or written"]
    for idx, exc in failures:
        who = "every partner" if len(idx) == cfg.partners and len(idx) > 1 else \
            f"partner{'s' if len(idx) > 1 else ''} {_ranges(idx)} ({', '.join(names[i] for i in idx[:4])}" \
            f"{', ...' if len(idx) > 4 else ''})"
        text = str(exc) if isinstance(exc, FedpropError) else f"{type(exc).__name__}: {exc}"
        body = text.splitlines()
        alike = " (the first of them; the others alike)" if len(idx) > 1 and not shared else ""
        lines.append(f"  {who}{' (one shared file)' if shared else ''}: {body[0]}{alike}")
        lines += [f"  {x}" for x in body[1:]]
    lines.append("Fix the above and run again (check a partner file alone with: fedprop data check CONTRACT FILE).")
    return "\n".join(lines)
