"""The inventory of everything a partner node sends: each field of each reply kind is exactly one of

* ``public``      -- public by declaration (architecture, round number, partner id, public size bucket, privacy
                     parameters that are functions of public quantities, protocol keys and ciphertexts, coarse
                     timings the coordinator observes anyway);
* ``dp_release``  -- the output of a DP mechanism recorded in the partner's ledger BEFORE the reply leaves
                     (``ledger`` names the entry kind);
* ``non_private`` -- sent only by a run with ``privacy.enabled=false``, which claims no guarantee.

Anything not listed here must not leave a node: ``tests/privacy/test_inventory.py`` captures every reply of a
real simulation and of a real secure-aggregation round and fails on any field this table does not list.
docs/release-inventory.md is generated from this table (``render_markdown``) and the compliance statement,
``docs/compliance.md``, the partner guide and the model card describe exactly this and nothing more.

Fields are ``<record kind>:<record name>/<key>``; ``*`` in a key matches a task head or timing phase name
(``fnmatch``); SecAgg payload fields are ``configs:secagg/payload.<json key>``.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

PUBLIC, DP, NON_PRIVATE = "public", "dp_release", "non_private"


@dataclass(frozen=True)
class Field:
    message: str  # the reply's message type: train | evaluate | query.secagg
    pattern: str  # <record kind>:<record name>/<key pattern>
    category: str
    what: str
    ledger: str = ""  # ledger entry kind recorded before release (dp_release only)


INVENTORY: tuple[Field, ...] = (
    # ---------------------------------------------------------------- train reply (plain FedAvg / FedProx / FedAdam)
    Field("train", "arrays:arrays/*", DP, "the model after this round of local DP-SGD (Poisson-subsampled Gaussian, "
          "per-customer clipping)", "dpsgd_round"),
    Field("train", "metrics:metrics/num-examples", PUBLIC, "FedAvg weight: the public size bucket of the training set "
          "(count rounded down to 2 significant digits, or the node's declared public-size); exact count if non-private"),
    Field("train", "metrics:metrics/partition-id", PUBLIC, "the partner's index in the federation"),
    Field("train", "metrics:metrics/epsilon", PUBLIC, "cumulative epsilon of this run so far, a function of the public "
          "mechanism parameters below"),
    Field("train", "metrics:metrics/epsilon-with-evaluation", PUBLIC, "the same plus the run's reserved evaluation "
          "releases: what a model evaluated after this round has cost"),
    Field("train", "metrics:metrics/delta", PUBLIC, "the run's delta"),
    Field("train", "metrics:metrics/noise-multiplier", PUBLIC, "DP-SGD sigma (calibrated from public quantities)"),
    Field("train", "metrics:metrics/sample-rate", PUBLIC, "Poisson sampling rate q = batch size / public size bucket"),
    Field("train", "metrics:metrics/steps", PUBLIC, "DP-SGD steps per round (from q and the configured epochs)"),
    Field("train", "metrics:metrics/time.*-s", PUBLIC, "wall-clock seconds per phase, rounded to 10 ms (the coordinator "
          "observes the reply latency anyway)"),
    Field("train", "configs:ledger/update-hash", PUBLIC, "SHA-256 of the released update (a commitment to the DP release)"),
    Field("train", "configs:ledger/entry-seq", PUBLIC, "sequence number of the ledger entry that recorded this release"),
    Field("train", "configs:ledger/entry-hash", PUBLIC, "hash of that ledger entry (the server keeps it as a witness)"),
    Field("train", "configs:ledger/ledger-id", PUBLIC, "the partner ledger's id (a new id after an explicit reset)"),
    Field("train", "configs:ledger/ledger-partner", PUBLIC, "the partner name its ledger records"),
    Field("train", "configs:ledger/head-signature", PUBLIC, "the node's Ed25519 signature (ledger key) of that head "
          "(ledger id, seq, entry hash): only heads it signed count in the server's witness"),
    Field("train", "metrics:metrics/train-loss", NON_PRIVATE, "mean training loss: only when privacy.enabled=false"),
    # ---------------------------------------------------------------- evaluate reply
    Field("evaluate", "metrics:metrics/*.hist.pos", DP, "per public score bin, held-out positives + discrete Gaussian "
          "noise (one head: sensitivity 1)", "evaluation_release"),
    Field("evaluate", "metrics:metrics/*.hist.neg", DP, "per public score bin, held-out negatives + discrete Gaussian "
          "noise (same release as .pos)", "evaluation_release"),
    Field("evaluate", "metrics:metrics/*.hist.format_version", PUBLIC, "release format (2 = DP counts)"),
    Field("evaluate", "metrics:metrics/*.hist.edges", PUBLIC, "the public, data-independent bin edges"),
    Field("evaluate", "metrics:metrics/*.hist.sigma", PUBLIC, "the discrete Gaussian's sigma (calibrated from public "
          "quantities), for the server's error bars"),
    Field("evaluate", "metrics:metrics/num-examples", PUBLIC, "the constant 1 (Flower needs a weight key)"),
    Field("evaluate", "metrics:metrics/partition-id", PUBLIC, "the partner's index in the federation"),
    Field("evaluate", "metrics:metrics/time.*-s", PUBLIC, "wall-clock seconds per phase, rounded to 10 ms"),
    Field("evaluate", "configs:ledger/entry-seq", PUBLIC, "sequence number of the ledger entry that recorded the last "
          "of this reply's evaluation releases"),
    Field("evaluate", "configs:ledger/entry-hash", PUBLIC, "hash of that ledger entry (the server keeps it as a witness, "
          "so a copy of the ledger from before the evaluation fails verify --against)"),
    Field("evaluate", "configs:ledger/ledger-id", PUBLIC, "the partner ledger's id"),
    Field("evaluate", "configs:ledger/ledger-partner", PUBLIC, "the partner name its ledger records"),
    Field("evaluate", "configs:ledger/head-signature", PUBLIC, "the node's signature (ledger key) of that head, as in a "
          "train reply"),
    Field("evaluate", "metrics:metrics/*.hist.bins", NON_PRIVATE, "exact histogram (non-private runs only)"),
    Field("evaluate", "metrics:metrics/*.hist.sum_score", NON_PRIVATE, "exact histogram (non-private runs only)"),
    Field("evaluate", "metrics:metrics/*.hist.sum_logloss", NON_PRIVATE, "exact histogram (non-private runs only)"),
    Field("evaluate", "metrics:metrics/*.hist.sum_brier", NON_PRIVATE, "exact histogram (non-private runs only)"),
    # ---------------------------------------------------------------- any reply
    Field("*", "configs:partner/name", PUBLIC, "the partner's name set at onboarding (node config partner)"),
    Field("*", "error:reason", PUBLIC, "an error or refusal reply: a code and a reason naming the privacy parameters "
          "and budget figures of the refusal (never data values: errors carry codes and column names)"),
    # ---------------------------------------------------------------- secure aggregation stages (query.secagg)
    Field("query.secagg", "configs:secagg/payload.keys", PUBLIC, "advertise: the node's two fresh X25519 public keys, a "
          "hash commitment to its fresh self-mask seed, and (with secagg-key) its Ed25519 identity key and signature"),
    Field("query.secagg", "configs:secagg/payload.shares", PUBLIC, "share_keys: Shamir shares of the node's secrets, "
          "each AEAD-encrypted to one neighbour (ciphertext to the server)"),
    Field("query.secagg", "configs:secagg/masked", DP, "masked_input: the node's quantized DP update plus pairwise and "
          "self masks (uniform modulo 2^k to the server); the update inside is the dpsgd_round release", "dpsgd_round"),
    Field("query.secagg", "configs:secagg/payload.b", PUBLIC, "unmask: shares of surviving neighbours' self-mask seeds "
          "(reveal only the sum)"),
    Field("query.secagg", "configs:secagg/payload.s", PUBLIC, "unmask: shares of dropped neighbours' mask keys"),
    Field("query.secagg", "configs:secagg/payload.rejected", PUBLIC, "masked_input: ids of neighbours whose encrypted "
          "shares failed authentication (they become dropouts)"),
    # beside the masked input, in the clear: this release's ledger head, the server's witness against a rollback
    Field("query.secagg", "configs:witness/update-hash", PUBLIC, "masked_input: SHA-256 of the node's unmasked DP "
          "update, as in a plain train reply (a commitment: nothing of the update without its exact value)"),
    Field("query.secagg", "configs:witness/entry-seq", PUBLIC, "masked_input: sequence number of the ledger entry "
          "that recorded this release"),
    Field("query.secagg", "configs:witness/entry-hash", PUBLIC, "masked_input: hash of that ledger entry (the server "
          "keeps it as a witness)"),
    Field("query.secagg", "configs:witness/ledger-id", PUBLIC, "masked_input: the partner ledger's id"),
    Field("query.secagg", "configs:witness/ledger-partner", PUBLIC, "masked_input: the partner name its ledger "
          "records"),
    Field("query.secagg", "configs:witness/head-signature", PUBLIC, "masked_input: the node's signature (ledger key) "
          "of that head, as in a plain train reply"),
)

_ALL_SECAGG_PAYLOAD = ("keys", "shares", "b", "s", "rejected")


def lookup(message: str, field: str) -> Field | None:
    for f in INVENTORY:
        if f.message in (message, "*") and fnmatch.fnmatchcase(field, f.pattern):
            return f
    return None


def fields_of(message_type: str, content: Any) -> list[str]:
    """Every field of a reply's RecordDict, as inventory field names (SecAgg JSON payloads are opened)."""
    out: list[str] = []
    for name, rec in content.array_records.items():
        out += [f"arrays:{name}/{k}" for k in rec.keys()]
    for name, rec in content.metric_records.items():
        out += [f"metrics:{name}/{k}" for k in rec.keys()]
    for name, rec in content.config_records.items():
        for k in rec.keys():
            if name == "secagg" and k == "payload":
                try:
                    payload = json.loads(bytes(rec[k]))
                except (TypeError, ValueError):
                    out.append(f"configs:{name}/{k}")
                    continue
                out += [f"configs:{name}/{k}.{j}" for j in (payload if isinstance(payload, Mapping) else {"<non-mapping>": 0})]
            else:
                out.append(f"configs:{name}/{k}")
    return out


def undeclared(captured: Iterable[tuple[str, str]], *, private_run: bool = True) -> list[str]:
    """(message type, field) pairs that the inventory does not list (or lists as non-private in a private run)."""
    bad = []
    for message, field in captured:
        f = lookup(message, field)
        if f is None or (private_run and f.category == NON_PRIVATE):
            bad.append(f"{message} {field}")
    return sorted(set(bad))


def render_markdown() -> str:
    lines = ["| reply | field | category | what | ledger entry before release |", "|---|---|---|---|---|"]
    for f in INVENTORY:
        lines.append(f"| {f.message} | `{f.pattern}` | {f.category} | {f.what} | {f.ledger or '-'} |")
    return "\n".join(lines) + "\n"
