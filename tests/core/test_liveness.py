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
    """A dead node's error reply carries only its node id: the server names the partner it learned earlier."""
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

    from server.strategy import RecordingStrategy

    class Inner:
        def aggregate_train(self, server_round, replies):
            return None, None

    def meta(node):
        return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")

    def ok(node, name):
        content = RecordDict({"metrics": MetricRecord({"partition-id": 0}), "partner": ConfigRecord({"name": name})})
        return Message(content=content, metadata=meta(node))

    def dead(node):
        return Message(error=Error(code=0, reason="Node Unavailable - failed to report a heartbeat"), metadata=meta(node))

    s = RecordingStrategy(Inner())
    s._current = {"round": 1, "partners": {}, "refusals": [], "server": {}}
    s._aggregate_train(1, [ok(11, "acme"), ok(12, "globex")])
    s._current = {"round": 2, "partners": {}, "refusals": [], "server": {}}
    s._aggregate_train(2, [ok(11, "acme"), dead(12)])
    [missing] = s._current["refusals"]
    assert missing["partner"] == "globex" and missing["node"] == 12 and "Node Unavailable" in missing["reason"]
    assert "round 2 training: globex (node 12) did not contribute: Node Unavailable" in capsys.readouterr().out
