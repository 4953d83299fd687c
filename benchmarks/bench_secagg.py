"""Cost of one secure-sum round (SecAgg / SecAgg+, pure protocol compute) against a plain numpy sum.

    python benchmarks/bench_secagg.py                  # n in 5 10 20 50, d = 3000
    python benchmarks/bench_secagg.py --n 10 100 --d 3000 --reps 3

Everything runs in one process with no network: "clients" is the summed compute of all clients' stages
(key generation, Shamir sharing, share encryption/decryption, mask expansion, quantization), "per client"
that figure divided by n (what one partner pays), "server" the server's stages (routing, Shamir
reconstruction, mask removal, dequantization). The ratio is (clients + server) / plain sum, where the plain
sum is ``np.sum`` over the n float64 update vectors. Median of --reps repetitions. Message latency is not
included: under Flower's simulation engine each of the four stages costs a message round trip (~0.1-0.2 s).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.secagg.primitives import QuantizationSpec  # noqa: E402
from federation.secagg.protocol import (  # noqa: E402
    SecAggConfig,
    client_advertise,
    client_masked_input,
    client_share_keys,
    client_unmask,
    server_collect_keys,
    server_collect_masked,
    server_route_shares,
    server_unmask,
)


def one_round(updates: dict[int, np.ndarray], config: SecAggConfig) -> tuple[float, float, np.ndarray]:
    client_t = server_t = 0.0

    def timed(fn, **kw):
        t0 = time.perf_counter()
        out = fn(**kw)
        return out, time.perf_counter() - t0

    cs, adverts = {}, {}
    for u in updates:
        (cs[u], adverts[u]), dt = timed(client_advertise, config=config, node_id=u)
        client_t += dt
    (server, bcs), dt = timed(server_collect_keys, config=config, adverts=adverts)
    server_t += dt
    shares = {}
    for u in updates:
        (cs[u], shares[u]), dt = timed(client_share_keys, state=cs[u], broadcast=bcs[u])
        client_t += dt
    (server, routed), dt = timed(server_route_shares, state=server, shares=shares)
    server_t += dt
    masked = {}
    for u in updates:
        (cs[u], masked[u]), dt = timed(client_masked_input, state=cs[u], ciphertexts=routed[u], update=updates[u])
        client_t += dt
    (server, reqs), dt = timed(server_collect_masked, state=server, masked=masked)
    server_t += dt
    resps = {}
    for u in updates:
        (cs[u], resps[u]), dt = timed(client_unmask, state=cs[u], request=reqs[u])
        client_t += dt
    result, dt = timed(server_unmask, state=server, responses=resps)
    server_t += dt
    return client_t, server_t, result.total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--d", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"d = {args.d}, median of {args.reps} reps, times in ms")
    print(f"{'n':>4} {'graph':>10} {'t':>3} {'clients':>9} {'per client':>11} {'server':>8} {'plain sum':>10} {'ratio':>9}")
    for n in args.n:
        ids = list(range(1, n + 1))
        updates = {u: rng.uniform(-1, 1, args.d) for u in ids}
        degree_plus = 2 * math.ceil(math.log2(n))
        graphs = [None] + ([degree_plus] if degree_plus < n - 1 else [])
        for degree in graphs:
            holders = n if degree is None else degree + 1
            threshold = holders // 2 + 1
            rows = []
            for _ in range(args.reps):
                config = SecAggConfig(round_id=os.urandom(16), threshold=threshold, vector_length=args.d,
                                      quantization=QuantizationSpec(clip=1.0, max_summands=max(n, 8)),
                                      degree=degree, graph_seed=os.urandom(16))
                c, s, total = one_round(updates, config)
                stack = list(updates.values())
                t0 = time.perf_counter()
                plain = np.sum(stack, axis=0)
                p = time.perf_counter() - t0
                assert np.abs(total - plain).max() <= config.quantization.sum_error_bound(n)
                rows.append((c, s, p))
            c, s, p = (statistics.median(r[i] for r in rows) for i in range(3))
            label = "complete" if degree is None else f"k={degree}"
            print(f"{n:>4} {label:>10} {threshold:>3} {c * 1e3:>9.1f} {c / n * 1e3:>11.2f} {s * 1e3:>8.1f} "
                  f"{p * 1e3:>10.3f} {(c + s) / p:>9.0f}x")


if __name__ == "__main__":
    main()
