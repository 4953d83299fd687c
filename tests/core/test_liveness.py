"""A round needs only strategy.min_partners online (default: half), and waits at most strategy.round_timeout."""
from federation.config import from_dict, min_partners
from server.strategy import build_strategy


def test_default_keeps_going_without_one_of_three_partners():
    cfg = from_dict({"partners": 3})
    s = build_strategy(cfg, heads=("churn", "propensity"), num_partners=3)
    assert min_partners(cfg) == 2 and s.min_available_nodes == 2 and s.min_train_nodes == 2


def test_explicit_minimum_and_timeout():
    cfg = from_dict({"partners": 5, "strategy": {"min_partners": 5, "round_timeout": 30.0}})
    assert build_strategy(cfg, heads=("churn",), num_partners=5).min_available_nodes == 5
    assert min_partners(from_dict({"partners": 1})) == 1


def test_a_partner_that_stops_replying_is_named_from_its_earlier_replies(capsys):
    """Flower's error reply for a dead node does not carry that node's id (measured on loopback: src_node_id 1):
    the server names the partner it asked and that sent nothing usable, from the names of its earlier replies."""
    from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

    from server.strategy import RecordingStrategy

    class Inner:
        def configure_train(self, server_round, arrays, config, grid):
            return [Message(content=RecordDict(), metadata=Metadata(
                run_id=1, message_id="", src_node_id=0, dst_node_id=n, reply_to_message_id="", group_id="1",
                created_at=0.0, ttl=60.0, message_type="train")) for n in (11, 12)]

        def aggregate_train(self, server_round, replies):
            return None, None

    def meta(node):
        return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")

    def ok(node, name):  # a well-formed train reply (a model and its FedAvg weight): the server's screen passes it
        import torch
        from flwr.app import ArrayRecord

        content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                              "metrics": MetricRecord({"partition-id": 0, "num-examples": 10}),
                              "partner": ConfigRecord({"name": name})})
        return Message(content=content, metadata=meta(node))

    dead = Message(error=Error(code=5, reason="Error: Node Unavailable - failed to report a heartbeat"), metadata=meta(1))
    s = RecordingStrategy(Inner())
    s.configure_train(1, None, None, None)
    s.aggregate_train(1, [ok(11, "acme"), ok(12, "globex")])
    assert "missing" not in s._current
    s.configure_train(2, None, None, None)
    s.aggregate_train(2, [ok(11, "acme"), dead])
    assert s._current["missing"] == {"training": ["globex"]}
    assert "Node Unavailable" in s._current["refusals"][0]["reason"]
    out = capsys.readouterr().out
    assert "round 2 training: no usable reply from globex (Error: Node Unavailable" in out
    s.configure_train(3, None, None, None)
    s.aggregate_train(3, [ok(11, "acme")])  # timed out, or no longer asked: no reply at all
    assert s._current["missing"] == {"training": ["globex"]} and "no reply before strategy.round_timeout" in capsys.readouterr().out


def test_rounds_without_scheduled_evaluation_name_nobody_missing(capsys):
    """Evaluation is a DP release asked for in scheduled rounds only: a round that asked nobody has nobody missing
    (a user saw 'round 1 evaluation: no usable reply from 0, 1, ...' in every unevaluated round)."""
    from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    from server.strategy import RecordingStrategy

    class Inner:
        def configure_train(self, server_round, arrays, config, grid):
            return []

        def aggregate_train(self, server_round, replies):
            return None, None

        def configure_evaluate(self, server_round, arrays, config, grid):
            raise AssertionError("evaluation was not scheduled for this round")

    meta = Metadata(run_id=1, message_id="m11", src_node_id=11, dst_node_id=0, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    s = RecordingStrategy(Inner(), evaluate_rounds={3})
    s.configure_train(1, None, None, None)
    s.aggregate_train(1, [Message(content=RecordDict({"metrics": MetricRecord({"partition-id": 0}),
                                                      "partner": ConfigRecord({"name": "acme"})}), metadata=meta)])
    assert s.configure_evaluate(1, None, None, None) == []
    s.aggregate_evaluate(1, [])
    assert "missing" not in s.rounds[-1]
    assert "no usable reply" not in capsys.readouterr().out


def test_the_round_line_says_when_a_dp_auc_is_not_meaningful():
    """The summary marks a DP AUC whose noise interval is wider than +-0.05 as not meaningful; the round's progress
    line printed the same number bare ('churn AUC 0.590'), as if it were a measurement."""
    from server.outputs import progress_line

    rec = {"round": 3, "partners": {}, "refusals": [],
           "evaluate": {"churn.auc_roc": 0.59, "churn.auc_roc_half_width": 0.094, "churn.auc_roc_meaningful": 0,
                        "propensity.auc_roc": 0.81, "propensity.auc_roc_half_width": 0.02,
                        "propensity.auc_roc_meaningful": 1}}  # as Flower's metric records hold them
    line = progress_line("fed", rec, rounds=3, heads=("churn", "propensity"))
    assert "churn AUC 0.590 +-0.094 (not meaningful at this noise)" in line
    assert "propensity AUC 0.810 +-0.020 |" in line
