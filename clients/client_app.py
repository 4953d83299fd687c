"""Flower ClientApp (Message API): a thin adapter from Message/Context to clients/node.py.

Per-node privacy state lives in ``context.state`` (it never leaves the node) so epsilon is cumulative
across rounds. A round that would exceed the partner's target epsilon is refused with an error reply
stating the numbers; the server carries on with the other partners.
"""
from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import node as N
from clients.privacy_state import PrivacyState
from federation.config import FedpropConfig, from_run_config
from federation.errors import BudgetExceededError
from federation.models import federations

STATE_KEY = "fedprop.privacy"
ERR_BUDGET = 4201


def _default_loader(cfg: FedpropConfig, node_config: dict):
    """Deployment: the node's data comes from its own node config (data-path + contract)."""
    from clients.local_data import load_node_features

    return load_node_features(cfg, node_config)


def make_client_app(*, config: FedpropConfig | None = None, loader: N.PartnerLoader | None = None) -> ClientApp:
    """Simulation passes its typed config and a partner loader; deployment reads ``context.run_config``."""
    app = ClientApp()
    load = loader or _default_loader

    def setup(msg: Message, context: Context):
        cfg = config or from_run_config(context.run_config)
        heads = msg.content["config"].get("heads", ",".join(federations(cfg.task, cfg.model.heads)[0]))
        data = N.load_partner(cfg, node_config=dict(context.node_config), loader=load, heads_key=str(heads))
        return cfg, data

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data = setup(msg, context)
        privacy = None
        if cfg.privacy.enabled:
            key = f"{STATE_KEY}.{msg.content['config'].get('heads', '')}"
            privacy = (
                PrivacyState.from_json(context.state[key]["json"]) if key in context.state
                else N.initial_privacy_state(cfg, data)
            )
            try:
                privacy.check_next_round()
            except BudgetExceededError as exc:
                context.state[key] = ConfigRecord({"json": privacy.after_refusal().to_json()})
                return Message(Error(code=ERR_BUDGET, reason=f"partner {data.partition_id}: {exc}"), reply_to=msg)
        state_dict = msg.content["arrays"].to_torch_state_dict()
        new_sd, metrics, privacy = N.train_round(
            cfg, data, state_dict, privacy,
            server_round=int(msg.content["config"]["server-round"]),
            proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        )
        if privacy is not None:
            context.state[key] = ConfigRecord({"json": privacy.to_json()})
        content = RecordDict({"arrays": ArrayRecord(new_sd), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, data = setup(msg, context)
        metrics = N.evaluate(cfg, data, msg.content["arrays"].to_torch_state_dict())
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = make_client_app()
