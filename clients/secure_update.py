"""A partner's side of secure FedAvg: the SecAgg masked-input stage runs this node's ordinary train round
(the very same ``@app.train`` handler: DP-SGD, cumulative privacy state in ``context.state``, ledger entry,
refusal) and turns its result into the vector that goes into the secure sum.

What leaves the node here: the masked vector (uniform modulo 2**k to the server) and, beside it in the clear, the
ledger head of this release (ledger id, partner, entry seq, entry hash, update hash: the same public record a plain
round sends), which the server keeps as its witness against a later rollback of this ledger. The local model, the
number of examples and the train metrics stay on the node; ``federation/secure_fedavg.py`` defines the vector.
A refusal (privacy budget) or any failure raises, which Flower turns into an error reply: the server treats
this partner as a dropout of this round, and the other partners' round completes while enough survive.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata
from flwr.clientapp import ClientApp

from federation.config import FedpropConfig, from_run_config
from federation.errors import BudgetExceededError
from federation.secagg.flower import STATE_KEY as SECAGG_STATE_KEY
from federation.secagg.flower import register_secagg
from federation.secagg.primitives import Entropy, SecAggError
from federation.secagg.protocol import ClientState
from federation.secure_fedavg import partner_vector, plan_problems

__all__ = ["ACTION", "flatten", "register_secure_update"]

ACTION = "secagg"  # message type query.secagg

TrainFn = Callable[[Message, Context], Message]


def flatten(arrays) -> np.ndarray:
    """An ArrayRecord as one float64 vector, in the record's key order (the server uses the same order)."""
    return np.concatenate([np.asarray(arrays[k].numpy(), dtype=np.float64).ravel() for k in arrays.keys()])


def _as_train_message(message: Message) -> Message:
    meta = copy.copy(message.metadata)
    meta.message_type = "train"
    return Message(content=message.content, metadata=meta)


def secure_update(
    message: Message, context: Context, *, train: TrainFn, config: FedpropConfig | None, entropy: Entropy
) -> np.ndarray:
    cfg = config or from_run_config(context.run_config)
    state = ClientState.from_bytes(bytes(context.state[SECAGG_STATE_KEY]["state"]))  # type: ignore[arg-type]
    sa = state.config
    # Recompute the round plan from this node's config: a lower threshold would shrink the noise share's
    # protection, a tiny clip would cancel it; any difference refuses the round before training.
    problems = plan_problems(cfg, threshold=sa.threshold, degree=sa.degree, vector_length=sa.vector_length,
                             quantization=sa.quantization, num_params=int(flatten(message.content["arrays"]).size),
                             participants_seen=len(state.participants))
    if problems:
        raise SecAggError("the server's secure-aggregation plan differs from this node's run config: "
                          + "; ".join(problems) + "; refusing to send an update")
    reply = train(_as_train_message(message), context)
    if reply.has_error():  # refusal (privacy budget) or ledger failure: this partner drops out of the round
        raise BudgetExceededError(reply.error.reason or f"train refused (code {reply.error.code})")
    delta = flatten(reply.content["arrays"]) - flatten(message.content["arrays"])
    num_examples = int(reply.content["metrics"]["num-examples"])
    from clients.noise import ChaChaNoise  # (torch: imported where a round runs, not with the ClientApp module)

    rng = ChaChaNoise(entropy(32))  # partner-level DP noise: a ChaCha20 keystream keyed by the OS CSPRNG
    vector = partner_vector(cfg, delta=delta, num_examples=num_examples, threshold=sa.threshold,
                            value_range_=sa.quantization.clip, rng=rng)
    if "ledger" in reply.content.config_records:  # this release's ledger head: the server's rollback witness
        return vector, ConfigRecord(dict(reply.content["ledger"]))
    return vector


def register_secure_update(
    app: ClientApp, *, train: TrainFn, config: FedpropConfig | None = None, entropy: Entropy = os.urandom
) -> None:
    """Answer the server's secure FedAvg rounds (``query.secagg``) with this node's ``train`` handler."""
    register_secagg(
        app, action=ACTION, entropy=entropy,
        update_fn=lambda m, c: secure_update(m, c, train=train, config=config, entropy=entropy),
    )
