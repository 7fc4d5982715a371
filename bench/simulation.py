"""Scale of ``fedmed-sim``: time per round and peak memory vs simulated sites (one JSON line).

    python bench/simulation.py                      # 4, 16, 32, 64 sites, 2 rounds each
    python bench/simulation.py --sites 4 16 --rounds 2
    python bench/simulation.py --sites 16 64 --per-round 4 8   # sampled sites per round

Each size runs the same small 3D U-Net (4/8/16 channels, 16^3 patches, ``--local-steps`` steps,
batch 1) on demo sites of 2 tiny cases (24x24x16), ``max-parallel`` sites at a time, volume
cache off (``cache-mode = none``: a site's volumes are read when it trains, so nothing per site
stays in the actors). Without ``--per-round`` every site trains every round; with it each run
samples that many sites per round (``sites-per-round``), for every listed size it does not
exceed.

Reports, per run, the seconds from the start until round 1 began (start-up: Flower's SuperLink
and Ray, the sites' registration, the server's held-out and round-0 work), the sites trained
per round, the mean round time (rounds after the first, whose actors import torch) and its
slope per site trained, and the peak resident memory of this process plus every process it
started (the simulation SuperLink, ``flwr-simulation``, Ray's GCS, raylet and actors), sampled
from /proc every 0.2 s. Expected: round time linear in the sites trained per round, memory flat
in the number of sites. The demo sites are generated
once in ``OUT/data`` and reused by later runs with at most as many sites.

    python bench/simulation.py --sites 100 1000 10000 --per-round 10 --rounds 3   # Flower's size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from fedmed.server.report import MetricsLog
from fedmed.simulation.engine import SiteResources, run_federation

from fedmed.data.demo import generate_demo_federation, site_name
from fedmed.flower.process import descendants
from fedmed.runsettings.settings import RunSettings

__all__ = ["main", "tree_rss_bytes"]


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux /proc)."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples :func:`tree_rss_bytes` of this process in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _demo_sites(data: Path, sites: int) -> list[Path]:
    """``sites`` demo sites of 2 tiny cases in ``data``, generated once: a later run with at
    most as many sites reuses them (``bench-data.json`` records what was generated)."""
    marker, spec = data / "bench-data.json", {"cases": 2, "seed": 0, "shape": [24, 24, 16]}
    if marker.is_file():
        made = json.loads(marker.read_text(encoding="utf-8"))
        if made.get("sites", 0) >= sites and {k: made.get(k) for k in spec} == spec:
            return [data / site_name(index) for index in range(sites)]
    folders = generate_demo_federation(
        data, sites=sites, cases=2, seed=0, shape=(24, 24, 16), holdout=0
    )
    marker.write_text(json.dumps({"sites": sites, **spec}), encoding="utf-8")
    return folders


def main(argv: list[str] | None = None) -> dict:
    """Run every size; print one line per size and the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, nargs="+", default=[4, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-parallel", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=1, help="optimizer steps per site and round")
    p.add_argument(
        "--per-round",
        type=int,
        nargs="+",
        default=[0],
        metavar="K",
        help="sites sampled per round (0 = every site; several values: one run each)",
    )
    p.add_argument("--out", default="bench-simulation")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    folders = _demo_sites(out / "data", max(args.sites))
    resources = SiteResources(num_cpus=1, max_parallel=args.max_parallel, cache_mode="none")
    sizes = []
    runs = [(n, k) for k in args.per_round for n in args.sites if k <= n]
    for n, k in runs:
        run_dir = out / (f"sites-{n}" if not k else f"sites-{n}-per-round-{k}")
        settings = RunSettings(
            num_rounds=args.rounds,
            min_sites=k or n,
            sites_per_round=k,
            model="unet3d",
            model_features="4,8,16",
            patch_size="16,16,16",
            local_steps=args.local_steps,
            batch_size=1,
            val_fraction=0.5,
            out_dir=str(run_dir),
            join_timeout=300.0,
            round_timeout=1800.0,
        )
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
        started, started_at = time.monotonic(), time.time()
        with PeakMemory() as mem:
            run_federation(settings, folders[:n], resources, workdir=out)
        wall = time.monotonic() - started
        records = [r for r in MetricsLog(run_dir).read() if r.get("status") == "ok"]
        rounds = [float(r["duration-s"]) for r in records]
        # round 1 began when its record was written (whole seconds, UTC) less its duration
        ended = datetime.strptime(records[0]["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        round_1_start = ended.timestamp() - rounds[0] - started_at
        trained = [len(r["sites"]) for r in records]
        warm = rounds[1:] or rounds
        per_round = sum(warm) / len(warm)
        size = {
            "sites": n,
            "sites-per-round": k,
            "trained-per-round": trained,
            "round-1-start-s": round(round_1_start, 1),
            "round-s": [round(x, 2) for x in rounds],
            "warm-round-s": round(per_round, 2),
            "s-per-site-trained": round(per_round / max(trained), 3),
            "peak-rss-mib": round(mem.peak / 2**20, 1),
            "wall-s": round(wall, 1),
        }
        print(json.dumps(size), flush=True)
        sizes.append(size)
    first, last = sizes[0], sizes[-1]
    result = {
        "bench": "simulation",
        "max-parallel": args.max_parallel,
        "rounds": args.rounds,
        "local-steps": args.local_steps,
        "per-round": args.per_round,
        "sizes": sizes,
        "round-time-ratio": round(last["warm-round-s"] / first["warm-round-s"], 2),
        "sites-ratio": last["sites"] / first["sites"],
        "trained-ratio": max(last["trained-per-round"]) / max(first["trained-per-round"]),
        "peak-rss-ratio": round(last["peak-rss-mib"] / first["peak-rss-mib"], 2),
    }
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
