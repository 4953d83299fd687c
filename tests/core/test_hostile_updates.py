"""Plain FedAvg against one hostile partner (it may send anything): a reply FedAvg cannot broadcast, NaN weights or
a missing weight must neither crash the server nor reach the global model; a diverged (non-finite) final model
is never released. Measured before the screen: NaN weights made the aggregate NaN, a (4, 2) array for a (3, 2)
parameter raised ValueError inside FedAvg, a missing parameter raised InconsistentMessageReplies."""
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from federation.config import from_dict
from server.strategy import INVALID_UPDATE, RecordingStrategy, build_strategy, screen_update

GLOBAL = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")


def _reply(node: int, sd, *, n=100, extra_arrays: bool = False) -> Message:
    metrics = {"partition-id": node} | ({} if n is None else {"num-examples": n})
    content = {"arrays": ArrayRecord(sd), "metrics": MetricRecord(metrics)}
    if extra_arrays:
        content["more"] = ArrayRecord({"x": torch.zeros(1)})
    return Message(content=RecordDict(content), metadata=_meta(node))


HOSTILE = {
    "nan": (dict(sd={"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}), "NaN or infinite"),
    "inf": (dict(sd={"w": torch.zeros(3, 2), "b": torch.tensor([float("inf"), 0.0])}), "NaN or infinite"),
    "shape": (dict(sd={"w": torch.zeros(4, 2), "b": torch.zeros(2)}), "float32[4, 2], the global model's float32[3, 2]"),
    "dtype": (dict(sd={"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2)}), "float64[3, 2]"),
    "keys": (dict(sd={"w": torch.zeros(3, 2)}), "parameter names"),
    "no weight": (dict(sd={"w": torch.zeros(3, 2), "b": torch.zeros(2)}, n=None), "num-examples"),
    "fractional weight": (dict(sd={"w": torch.zeros(3, 2), "b": torch.zeros(2)}, n=2.5), "num-examples"),
    "two records": (dict(sd={"w": torch.zeros(3, 2), "b": torch.zeros(2)}, extra_arrays=True), "2 array records"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_one_hostile_update_is_set_aside_and_the_honest_ones_are_averaged(kind, capsys):
    kwargs, reason = HOSTILE[kind]
    s = RecordingStrategy(build_strategy(from_dict({"partners": 3}), heads=("churn",), num_partners=3))
    s._arrays = ArrayRecord(GLOBAL)  # what configure_train keeps: the global model sent this round
    s._current = {"round": 1, "partners": {}, "refusals": [], "server": {}}
    honest = [_reply(1, {"w": torch.ones(3, 2), "b": torch.ones(2)}),
              _reply(2, {"w": 3 * torch.ones(3, 2), "b": 3 * torch.ones(2)})]
    arrays, _ = s.aggregate_train(1, [*honest, _reply(9, **kwargs)])
    got = arrays.to_torch_state_dict()
    assert torch.equal(got["w"], 2 * torch.ones(3, 2)) and torch.equal(got["b"], 2 * torch.ones(2))
    refusal = s._current["refusals"][-1]
    assert refusal["code"] == INVALID_UPDATE and refusal["node"] == 9 and reason in refusal["reason"]
    assert "9" not in s._current["partners"]  # not recorded as trained: it does not count towards a release
    assert "the update of partner 9 (node 9) is not aggregated" in capsys.readouterr().out


def test_the_screen_passes_an_honest_reply_and_names_no_value():
    assert screen_update(_reply(1, {"w": torch.ones(3, 2), "b": torch.ones(2)}), ArrayRecord(GLOBAL)) is None
    why = screen_update(_reply(1, {"w": torch.full((3, 2), 1234.5), "b": torch.tensor([float("nan"), 7.0])}),
                        ArrayRecord(GLOBAL))
    assert "'b'" in why and "1234.5" not in why and "7.0" not in why


def test_only_hostile_replies_aggregate_nothing():
    s = RecordingStrategy(build_strategy(from_dict({"partners": 2}), heads=("churn",), num_partners=2))
    s._arrays = ArrayRecord(GLOBAL)
    s._current = {"round": 1, "partners": {}, "refusals": [], "server": {}}
    arrays, _ = s.aggregate_train(1, [_reply(9, {"w": torch.zeros(4, 2), "b": torch.zeros(2)})])
    assert arrays is None and s._current["partners"] == {}


def test_a_non_finite_final_model_is_not_released(tmp_path):
    from server.outputs import RunOutputs
    from server.server_app import ReleaseRefused, _release_or_refuse

    cfg = from_dict({"partners": 1, "rounds": 1})
    out = RunOutputs(tmp_path)
    out.rounds["churn"] = [{"round": 1, "partners": {"0": {"train": {"num-examples": 100}}}}]
    final = ArrayRecord({"w": torch.tensor([[np.nan, 1.0]]), "b": torch.zeros(1)})
    with pytest.raises(ReleaseRefused, match="parameter.*w.*NaN or infinite"):
        _release_or_refuse(out, cfg, tag="churn", heads=("churn",), names=("a", "b"), final=final, pooled={})
    assert json.loads((tmp_path / "RELEASE_REFUSED_churn.json").read_text())["tag"] == "churn"
    assert not list(tmp_path.glob("model_*"))


def _eval_reply(node: int, pos, neg, *, edges, sigma=1.0, version=2, pid=None) -> Message:
    m = {"partition-id": node if pid is None else pid, "num-examples": 1, "churn.hist.format_version": version,
         "churn.hist.pos": [float(x) for x in pos], "churn.hist.neg": [float(x) for x in neg],
         "churn.hist.edges": [float(x) for x in edges], "churn.hist.sigma": sigma}
    return Message(content=RecordDict({"metrics": MetricRecord(m)}), metadata=_meta(node))


def _hostile_evaluations(edges):
    k = len(edges) - 1
    ones = [1.0] * k
    return {
        "nan counts": _eval_reply(9, [float("nan")] * k, ones, edges=edges),
        "short counts": _eval_reply(9, [1.0] * 3, [1.0] * 3, edges=edges),
        "other edges": _eval_reply(9, ones, ones, edges=[i / k for i in range(k + 1)]),
        "huge counts": _eval_reply(9, [1e300] * k, ones, edges=edges),
        "negative sigma": _eval_reply(9, ones, ones, edges=edges, sigma=-1.0),
        "old format": _eval_reply(9, ones, ones, edges=edges, version=1),
        "fractional partition id": _eval_reply(9, ones, ones, edges=edges, pid=2.5),
    }


@pytest.mark.parametrize("kind", sorted(_hostile_evaluations([0.0, 0.5, 1.0])))
def test_one_hostile_evaluation_release_is_set_aside_and_the_round_is_pooled(kind, capsys):
    """Measured before the screen: each of these raised inside the server's evaluation aggregation (NaN or short
    counts and a bad sigma: DataValidationError; other edges: ConfigError; 1e300: OverflowError), failing the run."""
    from federation import metrics as M

    cfg = from_dict({"partners": 2})
    edges = tuple(M.logit_edges(cfg.evaluation.bins))
    k = len(edges) - 1
    honest = _eval_reply(1, [0] * (k - 5) + [10] * 5, [10] * 5 + [0] * (k - 5), edges=edges)
    bad = _hostile_evaluations(edges)[kind]
    alone = RecordingStrategy(build_strategy(cfg, heads=("churn",), num_partners=2), eval_edges=edges)
    alone._current = {"round": 1, "partners": {}, "refusals": [], "server": {}}
    want = dict(alone.aggregate_evaluate(1, [honest]))
    s = RecordingStrategy(build_strategy(cfg, heads=("churn",), num_partners=2), eval_edges=edges)
    s._current = {"round": 1, "partners": {}, "refusals": [], "server": {}}
    got = dict(s.aggregate_evaluate(1, [honest, bad]))
    if kind == "fractional partition id":  # a well-formed release under a junk id is pooled, recorded under -1
        assert s._current["partners"]["-1"]["evaluate"]
        return
    assert got == want
    refusal = s._current["evaluate_refusals"][-1]
    assert refusal["code"] == INVALID_UPDATE and refusal["node"] == 9
    assert "is not pooled" in capsys.readouterr().out
