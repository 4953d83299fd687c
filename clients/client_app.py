"""Flower ClientApp (Message API): a thin adapter from Message/Context to clients/node.py.

Per-node privacy state lives in ``context.state`` (it never leaves the node) so epsilon is cumulative
across rounds. A round that would exceed the partner's target epsilon is refused with an error reply
stating the numbers; the server carries on with the other partners.

Imports are lazy: in a deployment Flower starts a fresh ClientApp process per message, so importing torch,
pandas, Opacus and dp-accounting at module level would be paid by every message, including the secure-
aggregation stages that need none of them. Each handler imports what it uses (``_heavy()``).
"""
from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from types import SimpleNamespace

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.config import FedpropConfig, config_hash, from_run_config
from federation.errors import BudgetExceededError, PrivacyError, public_reason

log = logging.getLogger("fedprop.node")


def _heavy() -> SimpleNamespace:
    """The modules a train or evaluate message needs (torch, pandas, accountants), imported on first use."""
    from clients import ledger_hooks
    from clients import node
    from clients.privacy_state import PrivacyState
    from federation.privacy.events import DiscreteGaussian

    return SimpleNamespace(LH=ledger_hooks, N=node, PrivacyState=PrivacyState, DiscreteGaussian=DiscreteGaussian)


def _is_policy_violation(exc: BaseException) -> bool:
    policy = sys.modules.get("federation.privacy.policy")  # loaded if it raised
    return policy is not None and isinstance(exc, policy.PolicyViolationError)
STATE_KEY = "fedprop.privacy"
LEDGER_STATE_KEY = "fedprop.ledger"
ERR_BUDGET = 4201
ERR_LEDGER = 4202  # the round's ledger entry could not be written: the update is withheld


RUN_ID_KEY = "fedprop-run-id"
_RUN_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def ledger_run_id(msg: Message, context: Context) -> str:
    """The run id this node keys its ledger entries by: the fedprop run id the server sends in the message config
    (it survives a resume, which is a new Flower run), else Flower's run id. The coordinator chooses it: re-using
    an id gets no second release of a recorded (run, round, heads) (``LH.round_recorded``), and a new id is new
    spend under this node's policy, so no choice of it lets the coordinator spend past the node's budget."""
    rid = str(msg.content["config"].get(RUN_ID_KEY, "") or "")
    if not rid:
        return str(context.run_id)
    if len(rid) > 64 or not set(rid) <= _RUN_ID_CHARS:
        raise ValueError(f"message config {RUN_ID_KEY} is not 1-64 letters, digits, '.', '_' or '-'")
    return rid


def _default_loader(cfg: FedpropConfig, node_config: dict):
    """Deployment: the node's data comes from its own node config (data-path + contract)."""
    from clients.local_data import load_node_features

    return load_node_features(cfg, node_config)


def _ledger_preflight(cfg: FedpropConfig, node: LH.NodeLedger, privacy: PrivacyState, run_id: str, heads: str) -> None:
    """The node's first train message of a run: the whole run's planned spend against policy + ledger."""
    H = _heavy(); LH, DiscreteGaussian = H.LH, H.DiscreteGaussian
    LH.preflight(
        node, run_id=run_id, sampling_rate=privacy.sample_rate, noise_multiplier=privacy.noise_multiplier,
        steps_per_round=privacy.steps_per_round, rounds=privacy.planned_rounds, delta=privacy.delta,
        clipping_norm=privacy.max_grad_norm, config_hash=config_hash(cfg),
        extra={"heads": heads, "target_epsilon": privacy.target_epsilon, "noise": cfg.privacy.noise,
               "accountant": privacy.accountant, "evaluation_sigma": privacy.eval_sigma,
               "evaluation_releases": privacy.eval_planned, "evaluation_share": privacy.eval_share,
               **({"reproducible_noise_no_guarantee": True} if cfg.privacy.noise == "reproducible" else {})},
        planned_extra=[DiscreteGaussian(noise_multiplier=privacy.eval_sigma, count=privacy.eval_planned)]
        if privacy.eval_planned else [],
    )


ERR_NODE = 4203  # any other failure at the node: the reply carries a code and column names only


def public_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower sends ``str(exception)`` of a failing handler to the coordinator; a data error's text may quote a
    customer id or a cell. Log it here in full, send only ``federation.errors.public_reason`` (category, codes,
    column names, counts). Budget refusals are fedprop's own text of public privacy parameters and pass as is."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, BudgetExceededError) or _is_policy_violation(exc):
            return Message(Error(code=ERR_BUDGET, reason=str(exc)), reply_to=msg)  # noqa: BLE001 -- every other failure leaves the node as a public reason only
        log.error("fedprop node: %s failed (details stay on this node)", msg.metadata.message_type, exc_info=exc)
        return Message(Error(code=ERR_NODE, reason=public_reason(exc)), reply_to=msg)


def _add_partner_name(content: RecordDict, context: Context) -> None:
    """A deployment partner's name (node config ``partner``, set at onboarding): public, it names the partner in the
    server's records, the model card and its reports. Absent in simulations (partners are their partition id)."""
    LH = _heavy().LH
    if context.node_config.get("partner"):
        content["partner"] = ConfigRecord({"name": LH.partner_name(dict(context.node_config))})


def node_split_key(cfg: FedpropConfig, node_config: dict, *, deployment: bool = True) -> bytes:
    """Deployment: the node's secret train/test split key, from node config ``split-key`` (a key file), else
    derived from the node's ledger signing key (which never leaves the node either)."""
    H = _heavy(); LH, N = H.LH, H.N
    if node_config.get("split-key"):
        return N.split_key_from_file(str(node_config["split-key"]))
    node = LH.resolve_node_ledger(cfg, node_config, deployment=deployment)
    LH.open_ledger(node).close()  # creates the default key if needed (refuses a missing explicit node-key)
    return N.split_key_from_file(str(node.key_path))


ALLOW_NON_PRIVATE = "allow-non-private"
ALLOW_REPRODUCIBLE_NOISE = "allow-reproducible-noise"


def _node_allows(node_config: dict, key: str) -> bool:
    value = node_config.get(key, False)
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))


def check_run_config_against_node(cfg: FedpropConfig, node_config: dict) -> None:
    """A deployed node's refusal of a run config that switches off its guarantee. Adversary: the coordinator, or
    anyone who can submit a run of the signed app (the run config is not signed). ``privacy.enabled=false`` would
    send exact counts, the training loss and un-noised models with no ledger entry and no policy check;
    ``privacy.noise=reproducible`` noise that whoever knows the seed can replay. Only the node's own config, set
    at onboarding, can allow either (``allow-non-private=true``, ``allow-reproducible-noise=true``)."""
    from federation.privacy.policy import PolicyViolationError

    if not cfg.privacy.enabled and not _node_allows(node_config, ALLOW_NON_PRIVATE):
        raise PolicyViolationError(
            "run refused by this node: the run config sets privacy.enabled=false (no differential privacy: exact "
            f"counts, loss and models would leave the node); only the node config can allow that ({ALLOW_NON_PRIVATE}=true)")
    if cfg.privacy.enabled and cfg.privacy.noise == "reproducible" and not _node_allows(node_config, ALLOW_REPRODUCIBLE_NOISE):
        raise PolicyViolationError(
            "run refused by this node: the run config sets privacy.noise=reproducible (DP noise derived from the run's "
            "seed: whoever knows it can remove the noise); only the node config can allow that "
            f"({ALLOW_REPRODUCIBLE_NOISE}=true)")


def make_client_app(*, config: FedpropConfig | None = None, loader: N.PartnerLoader | None = None,
                    split_key: bytes | None = None, mods: list | None = None) -> ClientApp:
    """Simulation passes its typed config, a partner loader and the run's secret split key (never in the run
    config); deployment reads ``context.run_config`` and takes the split key from the node's own key material.
    ``mods``: Flower client mods around every handler (tests use clients/capture.py)."""
    app = ClientApp(mods=[public_errors_mod, *(mods or [])])
    load = loader or _default_loader

    def setup(msg: Message, context: Context, times: N.PhaseTimes):
        N = _heavy().N
        from federation.models import federations
        cfg = config or from_run_config(context.run_config)
        node_config = dict(context.node_config)
        if config is None:  # deployment: the run config is the coordinator's, the node config the partner's
            check_run_config_against_node(cfg, node_config)
        heads = msg.content["config"].get("heads", ",".join(federations(cfg.task, cfg.model.heads)[0]))
        with times.phase("data-prep"):  # a cache hit after the first message of this partner in this process
            key = split_key if split_key is not None else node_split_key(cfg, node_config, deployment=config is None)
            data = N.load_partner(cfg, node_config=node_config, loader=load, heads_key=str(heads), split_key=key)
        return cfg, data

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        H = _heavy(); LH, N, PrivacyState = H.LH, H.N, H.PrivacyState
        times = N.PhaseTimes()
        cfg, data = setup(msg, context, times)
        privacy = None
        if cfg.privacy.enabled:
            heads_tag = str(msg.content['config'].get('heads', ''))
            key = f"{STATE_KEY}.{heads_tag}"
            lkey = f"{LEDGER_STATE_KEY}.{heads_tag}"
            node = LH.resolve_node_ledger(cfg, dict(context.node_config), deployment=config is None)
            run_id, server_round = ledger_run_id(msg, context), int(msg.content["config"]["server-round"])
            if lkey in context.state:  # the whole run was refused at preflight: nothing more to check
                return Message(Error(code=ERR_BUDGET, reason=str(context.state[lkey]["run-refused"])), reply_to=msg)
            restored = None
            if key not in context.state:  # a restarted node: its run's privacy state comes back from its ledger
                with times.phase("ledger"):
                    restored = LH.restore_run_state(node, run_id=run_id, heads=heads_tag)
                if restored is not None:
                    context.state[key] = ConfigRecord({"json": restored.to_json()})
            if key in context.state:
                privacy = PrivacyState.from_json(context.state[key]["json"])
                with times.phase("ledger"):
                    if LH.round_recorded(node, run_id=run_id, round=server_round, heads=heads_tag):
                        return Message(Error(code=ERR_BUDGET, reason=(
                            f"partner {data.partition_id}: round {server_round} of run {run_id} was already released and "
                            "recorded; not training it again (no second spend for one round)")), reply_to=msg)
            else:  # first train message of this run at this node: preflight before any training
                policy = LH.load_node_policy(node)
                privacy = N.initial_privacy_state(
                    cfg, data, accountants=() if policy.record_only else tuple(policy.allowed_accountants))
                try:
                    with times.phase("ledger"):
                        _ledger_preflight(cfg, node, privacy, run_id, heads_tag)
                except PrivacyError as exc:
                    reason = f"partner {data.partition_id}: run refused before training: {exc}"
                    context.state[lkey] = ConfigRecord({"run-refused": reason})
                    return Message(Error(code=ERR_BUDGET, reason=reason), reply_to=msg)
            try:  # the run's own target (all rounds + reserved evaluation), recorded if refused
                privacy.check_next_round()
            except BudgetExceededError as exc:
                with times.phase("ledger"):
                    LH.record_refusal(node, run_id=run_id, round=server_round, reason=str(exc))
                context.state[key] = ConfigRecord({"json": privacy.after_refusal().to_json()})
                return Message(Error(code=ERR_BUDGET, reason=f"partner {data.partition_id}: {exc}"), reply_to=msg)
        stack = ExitStack()
        res = None
        if privacy is not None:  # policy check and reservation of the round's spend: one ledger transaction
            try:
                with times.phase("ledger"):
                    res = stack.enter_context(LH.round_reservation(
                        node, run_id=run_id, round=server_round, sampling_rate=privacy.sample_rate,
                        noise_multiplier=privacy.noise_multiplier, steps=privacy.steps_per_round, delta=privacy.delta,
                        clipping_norm=privacy.max_grad_norm, config_hash=config_hash(cfg), heads=heads_tag))
            except PrivacyError as exc:
                stack.close()
                context.state[key] = ConfigRecord({"json": privacy.after_refusal().to_json()})
                return Message(Error(code=ERR_BUDGET, reason=f"partner {data.partition_id}: {exc}"), reply_to=msg)
        entry = None
        with stack:  # an exception below releases the reservation: nothing left the node
            with times.phase("deserialize"):
                state_dict = msg.content["arrays"].to_torch_state_dict()
            with times.phase("train"):
                new_sd, metrics, privacy = N.train_round(
                    cfg, data, state_dict, privacy,
                    server_round=int(msg.content["config"]["server-round"]),
                    proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
                )
            with times.phase("serialize"):
                arrays = ArrayRecord(new_sd)
            if res is not None:
                # The ledger entry is committed BEFORE the update is handed to Flower; no entry, no update.
                try:
                    with times.phase("ledger"):
                        ledger_id = res.ledger.ledger_id
                        entry = LH.commit_round(res, update_hash=LH.update_hash(new_sd), extra={
                            "heads": heads_tag, "run_epsilon": privacy.epsilon(), "accountant": privacy.accountant,
                            "target_epsilon": privacy.target_epsilon, "noise": cfg.privacy.noise})
                        # signed by this node's ledger key: nobody else can forge this head in the server's witness
                        head_signature = res.ledger.sign_head(entry.seq, entry.entry_hash)
                except Exception as exc:  # noqa: BLE001 -- whatever failed, the update must not leave the node
                    log.error("ledger entry for round %s not written", server_round, exc_info=exc)
                    reason = (f"partner {data.partition_id}: ledger entry for round {server_round} not written "
                              f"({public_reason(exc)}); update withheld")
                    return Message(Error(code=ERR_LEDGER, reason=reason), reply_to=msg)
                context.state[key] = ConfigRecord({"json": privacy.to_json()})
        metrics.update(N.public_timings(times))  # coarse timings of this message (operational metadata, no data)
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
        _add_partner_name(content, context)
        if entry is not None:
            content["ledger"] = ConfigRecord(
                {"update-hash": entry.update_hash, "entry-seq": entry.seq, "entry-hash": entry.entry_hash,
                 "ledger-id": ledger_id, "ledger-partner": node.partner, "head-signature": head_signature}
            )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        H = _heavy(); LH, N, PrivacyState = H.LH, H.N, H.PrivacyState
        times = N.PhaseTimes()
        cfg, data = setup(msg, context, times)
        heads_tag = str(msg.content['config'].get('heads', ''))
        refused = f"{LEDGER_STATE_KEY}.{heads_tag}"
        if refused in context.state:  # a run refused by the budget policy releases nothing, metrics included
            return Message(Error(code=ERR_BUDGET, reason=str(context.state[refused]["run-refused"])), reply_to=msg)
        privacy = None
        key = f"{STATE_KEY}.{heads_tag}"
        if cfg.privacy.enabled:
            if key not in context.state:
                return Message(Error(code=ERR_BUDGET, reason=f"partner {data.partition_id}: evaluation refused: this "
                                     "node has not planned this run's privacy budget (no training round yet)"), reply_to=msg)
            privacy = PrivacyState.from_json(context.state[key]["json"])
            try:
                privacy.check_next_evaluation(len(data.heads))
            except PrivacyError as exc:
                return Message(Error(code=ERR_BUDGET, reason=f"partner {data.partition_id}: {exc}"), reply_to=msg)
        with times.phase("deserialize"):
            state_dict = msg.content["arrays"].to_torch_state_dict()
        with times.phase("evaluate"):
            metrics, mechanisms = N.evaluate(cfg, data, state_dict, privacy)
        head = None
        if privacy is not None:  # a DP evaluation release: recorded (and budget-checked) before it leaves the node
            try:
                with times.phase("ledger"):
                    head = LH.record_evaluation(
                        LH.resolve_node_ledger(cfg, dict(context.node_config), deployment=config is None),
                        run_id=ledger_run_id(msg, context),
                        round=int(msg.content["config"].get("server-round", 0)), mechanisms=mechanisms,
                        delta=privacy.delta, config_hash=config_hash(cfg),
                    )
            except Exception as exc:  # noqa: BLE001 -- no ledger entry, no release
                if not isinstance(exc, PrivacyError):
                    log.exception("evaluation ledger entry not written")
                why = str(exc) if isinstance(exc, BudgetExceededError) or _is_policy_violation(exc) else public_reason(exc)
                return Message(Error(code=ERR_BUDGET if isinstance(exc, PrivacyError) else ERR_LEDGER,
                                     reason=f"partner {data.partition_id}: evaluation withheld: {why}"), reply_to=msg)
            context.state[key] = ConfigRecord({"json": privacy.after_evaluation(len(data.heads)).to_json()})
        with times.phase("serialize"):
            record = MetricRecord(metrics)
        record.update(N.public_timings(times))  # coarse timings of this message (operational metadata, no data)
        content = RecordDict({"metrics": record})
        _add_partner_name(content, context)
        if head is not None:  # the signed head after the evaluation releases: the server witnesses it too
            content["ledger"] = ConfigRecord(head)
        return Message(content=content, reply_to=msg)

    from clients.secure_update import register_secure_update  # numpy + cryptography only

    register_secure_update(app, train=train, config=config)  # secagg rounds run this same train handler
    return app


app = make_client_app()
