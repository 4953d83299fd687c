"""Per-round latency on Flower's simulation engine: plain FedAvg vs secure FedAvg, same tiny config.

    python benchmarks/bench_secagg_rounds.py plain
    python benchmarks/bench_secagg_rounds.py secagg

Prints the server's wall time per round (train + evaluate) and, for secure rounds, the secure-sum time
(which includes local training). Round 1 includes each node's data generation and DP calibration.
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.simulate import run_simulation  # noqa: E402
from tests.secagg_integration.conftest import tiny_config  # noqa: E402


def main(mode: str, rounds: int = 3) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    cfg = tiny_config(tmp, rounds=rounds, secagg={"enabled": mode == "secagg"})
    run_simulation(cfg, tmp)
    recs = json.loads((tmp / "federated_rounds.json").read_text())["churn+propensity"]
    print("LAT", mode, "round wall s:", [round(r["wall_s"], 2) for r in recs],
          "secure sum s:", [round(r["secagg"]["secure_sum_s"], 2) for r in recs if "secagg" in r])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "secagg")
