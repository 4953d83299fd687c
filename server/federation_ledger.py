"""The server's federation ledger: a record of every aggregate it releases with partner-level DP noise.

Same format as a partner's ledger (``federation.privacy.ledger``: append-only, hash-chained, Ed25519-signed
SQLite), entries of kind ``server_dp_round`` with privacy unit ``partner``. Plain functions, no Flower: the
partner-level DP wrapper calls ``record_server_release`` once per round, AFTER noising and BEFORE the new
global model is broadcast or checkpointed, so no noised aggregate is released without a record.

Mechanism recorded: Flower's server-side fixed clipping adds N(0, (noise_multiplier * clipping_norm)^2) to
the SUM of clipped partner updates (then divides by ``num_sampled``), so relative to the sum's L2
sensitivity (``clipping_norm``, one partner added or removed) it is a Gaussian with ``noise_multiplier``.
Flower samples a fixed number of partners, not a Poisson sample, so by default no amplification by
sampling is claimed (``Gaussian``). Pass ``sampling_rate`` only if partners really are Poisson-sampled
with that probability; the entry then records a ``PoissonSampledGaussian`` with one step.

``fedprop budget report <partner ledger> --server-ledger <this> --server-public-key <this .pub>`` combines
both layers in a partner's report (customer-level from the partner's ledger, partner-level from here).

The server's witness: ``record_partner_heads`` appends, once per round, the ledger head (ledger id, seq,
entry hash, and the node's signature of it) each partner sent with its reply. ``fedprop budget verify <partner ledger> --against <this>``
(``federation.privacy.ledger.verify_against``) then detects a partner ledger rolled back, truncated or
replaced after the run; an explicit reset (``fedprop budget init --reason``) shows as a new ledger id whose
signed genesis names the old one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from federation.errors import PrivacyError
from federation.privacy.events import Gaussian, PoissonSampledGaussian
from federation.privacy.ledger import Ledger, LedgerEntry, generate_node_key

__all__ = [
    "FEDERATION_PARTNER", "open_federation_ledger", "record_server_release", "server_release_event",
    "record_partner_heads", "SERVER_LEDGER_KEY", "server_ledger_key",
]

#: the federation ledger's signing key in the server's key folder (``release.key_dir``), never next to the ledger
SERVER_LEDGER_KEY = "federation-ledger.key"


def server_ledger_key(key_dir: str | Path) -> Path:
    """The server's federation-ledger key ``<key_dir>/federation-ledger.key`` (created on first use, 0600, public key
    at ``.pub``). Every writer of a run's federation ledger (the partner heads witness and the partner-level DP
    releases of secure rounds) signs with this one key: a ledger refuses appends by any other key."""
    key = Path(key_dir) / SERVER_LEDGER_KEY
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            generate_node_key(key)
        except PrivacyError:
            if not key.exists():  # lost a creation race: the other writer's key is used
                raise
    return key

#: ``partner`` field of server entries (the report keeps them apart from any partner's customer layer).
FEDERATION_PARTNER = "federation"


def open_federation_ledger(path: str | Path, *, key_path: str | Path | None = None) -> Ledger:
    """Open (creating) the federation ledger; the server key defaults to ``<path>.key`` next to it and is
    generated on first use (0600, public key at ``<key>.pub``). Close it with ``.close()`` or ``with``."""
    path = Path(path)
    key = Path(key_path) if key_path is not None else path.with_suffix(".key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not key.exists():
        if key_path is not None:
            raise PrivacyError(f"server ledger key {key} does not exist (give an existing key or none to generate one)")
        generate_node_key(key)
    return Ledger.open(path, signing_key=key)


def server_release_event(*, noise_multiplier: float, sampling_rate: float | None = None):
    if sampling_rate is None:
        return Gaussian(noise_multiplier=noise_multiplier, count=1)
    return PoissonSampledGaussian(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier, steps=1)


def record_server_release(
    ledger: Ledger,
    *,
    run_id: str,
    round: int,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled: int,
    delta: float,
    update_hash: str,
    sampling_rate: float | None = None,
    num_partners: int | None = None,
    config_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> LedgerEntry:
    """Append one ``server_dp_round`` entry (durable when this returns). ``update_hash`` is the SHA-256 of
    the released (noised) aggregate, e.g. ``clients.ledger_hooks.update_hash(state_dict)``'s algorithm."""
    if isinstance(num_sampled, bool) or not isinstance(num_sampled, int) or num_sampled < 1:
        raise PrivacyError(f"num_sampled must be an integer >= 1, got {num_sampled!r}")
    info = {"num_sampled": num_sampled, **({"num_partners": num_partners} if num_partners is not None else {})}
    return ledger.append(
        kind="server_dp_round", partner=FEDERATION_PARTNER, run_id=str(run_id), round=int(round), delta=delta,
        mechanism=server_release_event(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate),
        clipping_norm=clipping_norm, config_hash=config_hash, update_hash=update_hash, privacy_unit="partner",
        extra={**info, **dict(extra or {})},
    )


def _clean_head(partner: str, h: Mapping[str, Any]) -> dict[str, Any]:
    seq, entry_hash = h.get("seq"), h.get("entry_hash")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or not isinstance(entry_hash, str) or not entry_hash:
        raise PrivacyError(f"partner {partner!r}: a head needs seq (int >= 0) and entry_hash (str), got {dict(h)!r}")
    return {"seq": seq, "entry_hash": entry_hash,
            **{k: h[k] for k in ("ledger_id", "reset", "reset_of", "signature", "node") if h.get(k) is not None}}


def record_partner_heads(
    ledger: Ledger, *, run_id: str, round: int, heads: Mapping[str, Mapping[str, Any]],
    conflicts: Sequence[Mapping[str, Any]] = (),
) -> LedgerEntry:
    """Append one ``partner_heads`` entry: for each partner (its ledger's ``partner`` name), the head it
    reported with this round's reply: ``{"seq": int, "entry_hash": str, "ledger_id": str (optional),
    "reset": bool (optional), "reset_of": str (optional), "signature": hex (the node's signature of the head,
    ``Ledger.sign_head``), "node": int (the Flower node that sent it)}``. ``conflicts``: further heads claimed under
    a name already in ``heads`` by another node this round (each with its ``partner``), kept rather than dropped so
    that a hostile node claiming a partner's name cannot hide that partner's genuine head (verification counts only
    heads signed by the partner's own key). Durable when this returns."""
    clean = {str(partner): _clean_head(str(partner), h) for partner, h in heads.items()}
    extra: dict[str, Any] = {"heads": clean}
    if conflicts:
        extra["conflicts"] = [{"partner": str(c["partner"]), **_clean_head(str(c["partner"]), c)} for c in conflicts]
    return ledger.append(
        kind="partner_heads", partner=FEDERATION_PARTNER, run_id=str(run_id), round=int(round),
        privacy_unit="partner", extra=extra,
    )
