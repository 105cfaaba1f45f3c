"""Latency of `visae browse --serve` under 200 concurrent local connections.

    python benchmarks/bench_serve.py [--clients 200] [--requests 2000]

Serves a small site (an index and concept pages) on 127.0.0.1, opens `--clients` connections at
once in rounds until `--requests` requests were made, and prints the answered count and the
latency percentiles (wall seconds per request, connect to last byte).
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from pathlib import Path

import benchlib
import numpy as np

from visae.browse import serve


def _get(port: int, path: str) -> int:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "concepts").mkdir()
        (site / "index.html").write_text("<!doctype html>" + "x" * 20000)
        for j in range(50):
            (site / "concepts" / f"{j}.html").write_text(f"<p>concept {j}</p>" + "y" * 4000)
        httpd, _ = serve(site, 0, block=False)
        port = httpd.server_address[1]
        rounds = -(-args.requests // args.clients)
        lat: list[float] = []
        bad: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client(i: int) -> None:
            for r in range(rounds):
                try:
                    barrier.wait(timeout=120)
                except threading.BrokenBarrierError:
                    pass
                t0 = time.perf_counter()
                try:
                    st = _get(port, "/index.html" if i % 4 == 0 else f"/concepts/{(i + r) % 50}.html")
                except OSError as e:
                    st = repr(e)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if st != 200:
                        bad.append(str(st))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        httpd.shutdown()
        httpd.server_close()
    a = np.array(lat)
    out = {"clients": args.clients, "requests": len(a), "answered_200": len(a) - len(bad), "failed": len(bad),
           "p50_s": float(np.percentile(a, 50)), "p99_s": float(np.percentile(a, 99)), "max_s": float(a.max()),
           "over_1s": int((a > 1).sum()), "wall_s": wall}
    benchlib.report("bench_serve.py", out, args.json or None, argv)


if __name__ == "__main__":
    main()
