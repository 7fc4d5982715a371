"""Utility price of record-level DP: held-out Dice at target epsilons vs non-private FedAvg.

    python bench/privacy.py                         # 3 demo sites x 100 cases, eps 1 3 8, 3 seeds
    python bench/privacy.py --quick                 # machinery check: 2 sites x 16 cases, 1 seed
    python bench/privacy.py --epsilons 8 --seeds 1  # what fits
    python bench/privacy.py --data /data/Task09_Spleen --out bench-privacy-spleen

Data, the same for every run: a generated demo federation (seed 0; ``--sites`` x ``--cases``
cases of ``--shape`` voxels, site-C with noisy labels, ``--holdout`` held-out cases from a
neutral scanner), or ``--data DIR``, any MSD folder pooled and split into ``--sites`` by patient
(IID, 20 % of the patients held out), as fedmed-sim's pooled source does. Patient-level DP needs
patients: with the demo's 5 per site it cannot learn anything.

Runs (fedmed-sim's engine, FedAvg, COPLE-Net with group norm at reduced features on 2D slices,
the same settings in every run so that only DP differs): non-private FedAvg, and record-level
DP-SGD FedAvg (``dp-mode = "record"``) at each ``--epsilons`` target, each ``--seeds`` times
(training seed 0..N-1: initial weights, patches, the sites' small validation split, and the
patients and noise each site draws). Per target, the noise multiplier is calibrated by bisection
with fedmed's accountant so that the site with the fewest training patients (the largest sample
rate ``q = dp-patients-per-step / its training patients``) ends the run, ``rounds x
local-steps`` DP-SGD steps, at epsilon = target (add/remove one patient, ``--delta`` 1e-5); the
others end below. The run also asks ``dp-max-epsilon = 1.01 x target``.

Reports per run the held-out Dice after the last round and, per site, the final
``dp-epsilon-total`` it reported (asserted <= 1.01 x target) and the same epsilon recomputed
here with dp_accounting's RDP accountant from the site's reported parameters (asserted equal);
then the held-out Dice mean +- std over seeds per epsilon, minus non-private in points, and the
ratio. Anchor: NVFlare's BraTS18 study lost 3.6 Dice points to its DP filter (0.857 -> 0.821).

A run's result is ``OUT/<label>-seed<N>.json``; an existing one with the same settings is
reused (resume). Data and run folders go to ``--work`` (default ``OUT/work``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dp_accounting

from fedmed.io.msd import load_site_dataset, patient_id, split_cases
from fedmed.security.accountant import record_epsilon

__all__ = [
    "calibrate_noise",
    "check_dp_sites",
    "main",
    "rdp_epsilon",
    "summarize",
    "table_lines",
    "training_patients",
]

ANCHOR = {"study": "NVFlare BraTS18 (Li et al. 2019), DP filter", "dice": [0.857, 0.821]}
NONPRIVATE = "nonprivate"
SLACK = 1.01  # the reported epsilon may exceed the target by this factor at most


def calibrate_noise(
    target: float, *, sample_rate: float, steps: int, delta: float, rel_tol: float = 1e-3
) -> float:
    """Smallest noise multiplier (to ``rel_tol``) whose record-level epsilon after ``steps``
    Poisson-sampled steps at ``sample_rate`` is <= ``target`` at ``delta`` (bisection).

    Example:
        >>> sigma = calibrate_noise(3.0, sample_rate=0.1, steps=100, delta=1e-5)
        >>> 0.99 * 3 < record_epsilon(sample_rate=0.1, noise_multiplier=sigma, steps=100,
        ...                           delta=1e-5) <= 3
        True
    """
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target epsilon must be > 0 and finite, got {target!r}")

    def eps(sigma: float) -> float:
        return record_epsilon(
            sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, delta=delta
        )

    lo, hi = 0.0, 1.0  # eps(0) is inf: lo always above target, hi always at or below it
    while eps(hi) > target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            raise ValueError(f"epsilon {target} needs a noise multiplier above 1e4")
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def rdp_epsilon(*, sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon straight from dp_accounting (RDP), not through fedmed: the cross-check."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))


def training_patients(folder: str | Path, *, val_fraction: float, seed: int) -> int:
    """Training patients of a site folder under fedmed's by-patient validation split: the
    denominator of the site's DP-SGD sample rate."""
    train, _ = split_cases(load_site_dataset(folder).cases, val_fraction=val_fraction, seed=seed)
    return len({patient_id(c["case_id"]) for c in train})


def check_dp_sites(
    sites: Mapping[str, Mapping[str, Any]], *, target: float, steps: int, rates: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """Each site's final privacy record against the target: reported ``dp-epsilon-total`` <=
    ``SLACK x target``, recomputed with dp_accounting equal to the reported ``dp-epsilon``, the
    steps and sample rate as planned. AssertionError naming the site otherwise."""
    out = {}
    for site, m in sorted(sites.items()):
        recomputed = rdp_epsilon(
            sample_rate=m["dp-sample-rate"],
            noise_multiplier=m["dp-noise-multiplier"],
            steps=m["dp-steps"],
            delta=m["dp-delta"],
        )
        total = float(m["dp-epsilon-total"])
        assert total <= SLACK * target, f"{site}: dp-epsilon-total {total} > {SLACK} x {target}"
        assert math.isclose(recomputed, m["dp-epsilon"], rel_tol=1e-6), (site, recomputed, m)
        assert m["dp-steps"] == steps, f"{site}: {m['dp-steps']} DP-SGD steps, planned {steps}"
        assert math.isclose(m["dp-sample-rate"], rates[site], rel_tol=1e-9), (site, m, rates)
        out[site] = {
            "epsilon-total": total,
            "epsilon-recomputed": recomputed,
            "sample-rate": float(m["dp-sample-rate"]),
            "noise-multiplier": float(m["dp-noise-multiplier"]),
            "steps": int(m["dp-steps"]),
        }
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label (``nonprivate``, ``eps-<target>``): held-out Dice mean/std/n, and for DP the
    difference to non-private in points, the ratio, the calibrated sigmas, q and steps, the
    largest reported and recomputed site epsilon."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    base = None
    if NONPRIVATE in groups:
        base = statistics.fmean(r["holdout-dice"] for r in groups[NONPRIVATE])
    rows: dict[str, dict[str, Any]] = {}
    order = sorted(groups, key=lambda k: (k != NONPRIVATE, groups[k][0].get("target-epsilon", 0)))
    for label in order:
        runs = sorted(groups[label], key=lambda r: r["seed"])
        mean, std = _mean_std([r["holdout-dice"] for r in runs])
        row: dict[str, Any] = {
            "dice-mean": mean,
            "dice-std": std,
            "n": len(runs),
            "seeds": [r["seed"] for r in runs],
            "dice": [r["holdout-dice"] for r in runs],
        }
        if label != NONPRIVATE:
            sites = [s for r in runs for s in r["dp-sites"].values()]
            row.update(
                {
                    "target-epsilon": runs[0]["target-epsilon"],
                    "noise-multiplier": sorted({r["noise-multiplier"] for r in runs}),
                    "sample-rate": max(s["sample-rate"] for s in sites),
                    "steps": runs[0]["dp-steps"],
                    "max-epsilon-total": max(s["epsilon-total"] for s in sites),
                    "max-epsilon-recomputed": max(s["epsilon-recomputed"] for s in sites),
                    "minus-nonprivate-points": None if base is None else 100 * (mean - base),
                    "ratio": None if not base else mean / base,
                }
            )
        rows[label] = row
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_lines(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The printed table of :func:`summarize`'s rows."""
    head = (
        f"{'run':10} {'target eps':>10} {'sigma':>13} {'q':>6} {'steps':>5} {'n':>2} "
        f"{'held-out Dice':>15} {'vs non-priv':>11} {'ratio':>5} {'site eps max':>12} "
        f"{'recomputed':>10}"
    )
    lines = [head]
    for label, r in rows.items():
        dice = f"{r['dice-mean']:.3f} +- {_fmt(r['dice-std'], '.3f')}"
        if label == NONPRIVATE:
            lines.append(f"{label:10} {'-':>10} {'-':>13} {'-':>6} {'-':>5} {r['n']:>2} {dice:>15}")
            continue
        sigmas = r["noise-multiplier"]
        sigma = f"{sigmas[0]:.3f}" + (f"-{sigmas[-1]:.3f}" if len(sigmas) > 1 else "")
        lines.append(
            f"{label:10} {r['target-epsilon']:>10g} {sigma:>13} {r['sample-rate']:6.3f} "
            f"{r['steps']:>5} {r['n']:>2} {dice:>15} "
            f"{_fmt(r['minus-nonprivate-points'], '+.1f'):>11} {_fmt(r['ratio'], '.2f'):>5} "
            f"{r['max-epsilon-total']:12.3f} {r['max-epsilon-recomputed']:10.3f}"
        )
    return lines


def _prepare(args: argparse.Namespace, work: Path) -> tuple[list[Path], Path]:
    """The fixed federation: site folders and the held-out folder (written once)."""
    from fedmed.simulation.sites import pooled_federation

    from fedmed.data.demo import HOLDOUT_DIRNAME, generate_demo_federation

    marker = work / "data" / "ready.json"
    spec = {k: getattr(args, k) for k in ("data", "sites", "cases", "holdout")}
    spec["shape"] = list(args.shape)  # as JSON gives it back
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        ready = json.loads((work / "data" / "folders.json").read_text())
        return [Path(p) for p in ready["sites"]], Path(ready["holdout"])
    shutil.rmtree(work / "data", ignore_errors=True)
    if args.data:
        sim = pooled_federation(args.data, work / "data" / "pooled-split", sites=args.sites, seed=0)
        sites, holdout = list(sim.sites), sim.holdout
        if holdout is None:
            raise SystemExit(f"{args.data}: too few patients for a held-out set")
    else:
        print(f"writing {args.sites} demo sites x {args.cases} cases {args.shape}", flush=True)
        root = work / "data" / "demo"
        sites = generate_demo_federation(
            root, sites=args.sites, cases=args.cases, seed=0, shape=args.shape,
            holdout=args.holdout,
        )  # fmt: skip
        holdout = root / HOLDOUT_DIRNAME
    folders = {"sites": [str(p.absolute()) for p in sites], "holdout": str(holdout.absolute())}
    (work / "data" / "folders.json").write_text(json.dumps(folders))
    marker.write_text(json.dumps(spec))
    return [Path(p) for p in folders["sites"]], Path(folders["holdout"])


def _run(
    args: argparse.Namespace,
    label: str,
    seed: int,
    target: float | None,
    data: tuple[list[Path], Path],
    work: Path,
) -> dict[str, Any]:
    """One federation; its result dict (held-out Dice, DP records checked)."""
    from fedmed.server.report import MetricsLog
    from fedmed.simulation.engine import SiteResources, run_federation

    from fedmed.runsettings.settings import RunSettings

    folders, holdout = data
    names = [p.name for p in folders]
    steps = args.rounds * args.local_steps
    patients = {
        n: training_patients(f, val_fraction=args.val_fraction, seed=seed)
        for n, f in zip(names, folders, strict=True)
    }
    rates = {n: min(1.0, args.patients_per_step / k) for n, k in patients.items()}
    run_dir = work / "runs" / f"{label}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a partial run starts over
    values: dict[str, Any] = {
        "num-rounds": args.rounds, "strategy": "fedavg", "min-sites": len(folders),
        "model": "coplenet", "model-features": args.features, "model-norm": "group",
        "patch-size": args.patch, "local-epochs": 1, "local-steps": args.local_steps,
        "batch-size": round(args.patients_per_step), "lr": args.lr,
        "val-fraction": args.val_fraction, "seed": seed, "out-dir": str(run_dir),
        "data-dir": str(holdout), "dp-mode": "off",
    }  # fmt: skip
    result: dict[str, Any] = {"label": label, "seed": seed, "training-patients": patients}
    if target is not None:
        sigma = calibrate_noise(
            target, sample_rate=max(rates.values()), steps=steps, delta=args.delta
        )
        values.update(
            {
                "dp-mode": "record",
                "dp-clip-norm": args.clip_norm,
                "dp-noise-multiplier": sigma,
                "dp-patients-per-step": args.patients_per_step,
                "dp-delta": args.delta,
                "dp-max-epsilon": SLACK * target,
            }
        )
        result.update({"target-epsilon": target, "noise-multiplier": sigma, "dp-steps": steps})
        print(
            f"{label} seed {seed}: sigma {sigma:.4f} calibrated for q {max(rates.values()):.4f} "
            f"({min(patients.values())} training patients), {steps} steps, delta {args.delta:g}",
            flush=True,
        )
    started = time.monotonic()
    resources = SiteResources(num_cpus=1, max_parallel=args.max_parallel, cache_mode="memory")
    run_federation(RunSettings.from_run_config(values), folders, resources, workdir=work)
    ok = [r for r in MetricsLog(run_dir).read() if r.get("status") == "ok"]
    if len(ok) != args.rounds:
        raise SystemExit(f"{run_dir}: {len(ok)} of {args.rounds} rounds completed: see its log")
    final = ok[-1]
    result["holdout-dice"] = float(final["holdout"]["dice"])
    result["holdout-dice-per-round"] = [r["holdout"]["dice"] for r in ok]
    result["seconds"] = round(time.monotonic() - started, 1)
    if target is None:
        taken = {n: m.get("num-steps") for n, m in final["sites"].items()}
        assert set(taken.values()) == {args.local_steps}, f"non-private steps per round {taken}"
    else:
        result["dp-sites"] = check_dp_sites(final["sites"], target=target, steps=steps, rates=rates)
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) every run; print the table and the JSON summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="an MSD folder to pool and split (default: demo)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--cases", type=int, default=100, help="demo cases per site")
    p.add_argument("--holdout", type=int, default=20, help="demo held-out cases")
    p.add_argument("--shape", type=int, nargs=3, default=[32, 32, 16], help="demo volume shape")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--seeds", type=int, help="training seeds 0..N-1 (default 3; --quick 1)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=25, help="optimizer steps per round")
    p.add_argument("--patients-per-step", type=float, default=32.0, help="also the batch size")
    p.add_argument("--clip-norm", type=float, default=1.0, help="per patient's gradient")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--features", default="4,8,16,32,64", help="COPLE-Net channels")
    p.add_argument("--patch", default="32,32", help="2D patch size")
    p.add_argument("--val-fraction", type=float, default=0.02, help="sites' validation share")
    p.add_argument("--max-parallel", type=int, default=2, help="sites training at once")
    p.add_argument("--quick", action="store_true", help="2 sites x 16 cases, 2 rounds x 3 steps")
    p.add_argument("--out", default="bench-privacy", help="result JSONs")
    p.add_argument("--work", help="data and run folders (default OUT/work)")
    args = p.parse_args(argv)
    if args.quick:
        args.sites, args.cases, args.holdout, args.rounds, args.local_steps = 2, 16, 4, 2, 3
        args.patients_per_step = 4.0
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.shape = tuple(args.shape)
    from fedmed.simulation.console import configure_sim_logging

    configure_sim_logging(False)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's per-order notes
    out = Path(args.out).absolute()
    work = Path(args.work).absolute() if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        k.replace("_", "-"): getattr(args, k)
        for k in (
            "data", "sites", "cases", "holdout", "shape", "rounds", "local_steps",
            "patients_per_step", "clip_norm", "delta", "lr", "features", "patch", "val_fraction",
        )
    }  # fmt: skip
    settings["shape"] = list(args.shape)
    data = _prepare(args, work)
    results = []
    for seed in range(args.seeds):
        for target in (None, *args.epsilons):
            label = NONPRIVATE if target is None else f"eps-{target:g}"
            path = out / f"{label}-seed{seed}.json"
            if path.is_file():
                stored = json.loads(path.read_text())
                if stored["settings"] != settings:
                    raise SystemExit(f"{path} has other settings: remove it or use another --out")
                results.append(stored)
                print(f"{label} seed {seed}: held-out Dice {stored['holdout-dice']:.3f} (stored)")
                continue
            result = {**_run(args, label, seed, target, data, work), "settings": settings}
            path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
            results.append(result)
            print(
                f"{label} seed {seed}: held-out Dice {result['holdout-dice']:.3f} "
                f"({result['seconds']:.0f} s)",
                flush=True,
            )
    rows = summarize(results)
    print("\n".join(table_lines(rows)))
    print(
        f"anchor: {ANCHOR['study']} lost {100 * (ANCHOR['dice'][0] - ANCHOR['dice'][1]):.1f} "
        f"Dice points ({ANCHOR['dice'][0]} -> {ANCHOR['dice'][1]}); epsilon record-level per "
        f"site at delta {args.delta:g}, sites' epsilon <= {SLACK} x target asserted"
    )
    summary = {"bench": "privacy", "settings": settings, "seeds": args.seeds, "runs": rows}
    summary["anchor"] = ANCHOR
    print(json.dumps(summary, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
