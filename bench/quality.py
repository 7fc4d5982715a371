"""Study-grade quality: centralized, local-only, federated and personalized models over seeds.

    python bench/quality.py                          # configs/quality.toml, 5 seeds, every method
    python bench/quality.py --methods centralized,fedavg --seeds 5
    python bench/quality.py --quick                  # the machinery in minutes (tiny protocol)
    python bench/quality.py --table-only             # the table from the results kept so far
    python bench/quality.py --data /data/Task09_Spleen  # any MSD folder, split by patient
    python bench/quality.py --methods centralized,fedavg --app loss=dice   # a changed setting

The protocol (``configs/quality.toml``, a ``fedmed-sim`` settings file) fixes the data (the
demo federation generated once with the ``[sim]`` seed, or ``--data`` split by patient, and
each site's train/validation split, drawn once with that seed and held across training seeds
by :mod:`quality_data`) and varies only the run's training seed (initial weights, patch
sampling, site sampling). Every run is ``fedmed-sim``'s own machinery; the figures are read
from its ``cross_site.json``:

==============  ===========================  ===============================================
method          run                          model in cross_site.json
==============  ===========================  ===============================================
centralized     the FedAvg run's baseline    ``centralized`` (pooled training data)
local-only      the FedAvg run               ``local-only@<site>`` on its own split
fedavg          ``fedavg``                   ``global-final``
fine-tuned      the FedAvg run               ``finetuned@<site>`` on its own split
fedprox         ``fedprox``                  ``global-final``
fedbn           ``fedbn`` (SiloBN)           ``global-final`` (site statistics at a site,
                                             AdaBN on the held-out set)
scaffold        ``scaffold``                 ``global-final``
ditto           ``ditto``                    ``ditto@<site>`` on its own split
==============  ===========================  ===============================================

Each (method, seed) result is ``<results>/<method>-seed<S>.json`` (see
:mod:`bench.quality_table`); a run whose results all exist is skipped, so an interrupted
benchmark resumes at the first missing one, and the runs may be spread over sessions
(results go to ``bench/results/quality/<protocol>/`` by default: commit them). The table is
built from every result of the protocol present, and the last line printed is one JSON object
with its figures and the issue's goals.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedmed.simulation.apps import SitePolicy
from fedmed.simulation.cli import prepare_data, run_sim
from fedmed.simulation.config import DataSpec, SimConfig, load_sim_config
from fedmed.simulation.console import configure_sim_logging
from quality_data import pinned_sites
from quality_table import (
    FORMAT,
    METHODS,
    build_table,
    format_table,
    goals,
    load_results,
    result_path,
)

from fedmed.runsettings.settings import RunSettings
from fedmed.tomlfile import toml_value

__all__ = ["JOBS", "app_override", "main", "protocol", "read_results"]

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quality.toml"
RESULTS = ROOT / "bench" / "results" / "quality"
# method -> (the fedmed-sim run it comes from, its model label; {site} = each site)
JOBS: Mapping[str, tuple[str, str]] = {
    "centralized": ("fedavg", "centralized"),
    "local-only": ("fedavg", "local-only@{site}"),
    "fedavg": ("fedavg", "global-final"),
    "fine-tuned": ("fedavg", "finetuned@{site}"),
    "fedprox": ("fedprox", "global-final"),
    "fedbn": ("fedbn", "global-final"),
    "scaffold": ("scaffold", "global-final"),
    "ditto": ("ditto", "ditto@{site}"),
}
# --quick: the same machinery on a tiny federation and model (checks, not figures)
QUICK_APP = {
    "num-rounds": 3,
    "model-features": "4,8,16,32,64",
    "patch-size": "32,32",
    "local-steps": 2,
    "batch-size": 4,
}
QUICK_DATA = {"demo_cases": 6, "demo_holdout": 5, "demo_shape": (32, 32, 16)}
_KEEP = ("n", "n_undefined", "status", "mean", "ci_low", "ci_high", "worst_decile")


# the site-policy fields the first protocol hashed; a field added to SitePolicy later enters
# the identity only when set, so results stay comparable while it keeps its default
_POLICY_FIELDS_V1 = ("disclosure_floor", "share_models")


def _policy_identity(policy: SitePolicy) -> dict[str, Any]:
    default = SitePolicy()
    return {
        f.name: getattr(policy, f.name)
        for f in dataclasses.fields(policy)
        if f.name in _POLICY_FIELDS_V1 or getattr(policy, f.name) != getattr(default, f.name)
    }


def app_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--app``: the value read as a TOML value (``true``, ``0.5``,
    ``"8,16"``), else as a string (``loss=dice``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--app takes KEY=VALUE, got {text!r}")
    return key.strip(), toml_value(value)


def protocol(
    config: Path,
    *,
    quick: bool,
    data: str | None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> tuple[SimConfig, str, str]:
    """``(settings, name, hash)`` of the benchmark's protocol; the hash covers everything but
    the training seed, so results of another protocol never mix into the table. ``overrides``
    (``--app``) change run settings; the name says which (``quality-loss-dice``)."""
    cfg = load_sim_config(config)
    spec = cfg.data
    if data:
        spec = dataclasses.replace(spec, source="pooled", pooled=str(Path(data).absolute()))
    app = {**cfg.app, **dict(overrides)}
    policy = cfg.policy
    if quick:
        app.update(QUICK_APP)
        spec = dataclasses.replace(spec, **QUICK_DATA)
        policy = dataclasses.replace(policy, disclosure_floor=1)  # 1-2 validation cases a site
    cfg = dataclasses.replace(cfg, data=spec, app=app, policy=policy, strategies=("fedavg",))
    name = config.stem + ("-quick" if quick else "") + (f"-{Path(data).name}" if data else "")
    name += "".join(f"-{key}-{str(value).lower()}" for key, value in overrides)
    ident = {
        "sim": {"sites": cfg.sites, "data-seed": cfg.seed},
        "data": {k: v for k, v in dataclasses.asdict(spec).items() if k != "shifts"},
        "shifts": {k: dataclasses.asdict(v) for k, v in spec.shifts.items()},
        "sites": _policy_identity(cfg.policy),
        "app": {k: v for k, v in app.items() if k != "seed"},
        "split": "pinned-1",  # quality_data.pinned_sites: the same validation patients each seed
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return cfg, name, hashlib.sha256(blob).hexdigest()[:16]


def _prepared(cfg: SimConfig, out: Path, ident: str) -> DataSpec:
    """The federation's folders, written once per protocol under ``out`` and reused."""
    marker = out / "data.json"
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("protocol") == ident:
            return DataSpec(
                source="folders", folders=tuple(saved["sites"]), holdout=saved["holdout"]
            )
    data = prepare_data(cfg, out)
    saved = {"protocol": ident, "sites": [str(s) for s in data.sites],
             "holdout": str(data.holdout or "")}  # fmt: skip
    marker.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    return DataSpec(source="folders", folders=tuple(saved["sites"]), holdout=saved["holdout"])


def _entries(doc: Mapping[str, Any], model: str, data: str) -> dict[str, dict[str, Any]]:
    return {
        e["metric"]: {k: e[k] for k in _KEEP if k in e}
        for e in doc.get("entries", [])
        if e.get("model") == model and e.get("data") == data and "metric" in e
    }


def _holdout_series(path: Path) -> list[float | None]:
    if not path.is_file():
        return []
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return [
        (r.get("holdout") or {}).get("dice")
        for r in records
        if r.get("status") in ("ok", "initial")
    ]


def read_results(run: Path, job: str, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The results of ``methods`` from the finished ``fedmed-sim`` run in ``run``."""
    path = run / "runs" / job / "cross_site.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    sites = list(doc.get("sites", []))
    out = {}
    for method in methods:
        label = JOBS[method][1]
        per_site = {s: label.format(site=s) for s in sites}
        result: dict[str, Any] = {
            "models": per_site,
            "sites": {s: _entries(doc, m, f"val:{s}") for s, m in per_site.items()},
            "missing": doc.get("missing", []),
            "best-round": doc.get("best-round"),
            "rounds": doc.get("round"),
            "cross-site-sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        if "{site}" in label:  # a site's own model: the held-out set only if it travelled
            result["holdout-by-site"] = {
                s: _entries(doc, m, "holdout") for s, m in per_site.items()
            }
            result["holdout"] = None
        else:
            result["holdout"] = _entries(doc, label, "holdout")
            log = run / ("centralized" if method == "centralized" else f"runs/{job}")
            result["holdout-by-round"] = _holdout_series(log / "metrics.jsonl")
        out[method] = result
    return out


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_job(
    cfg: SimConfig, data: DataSpec, job: str, seed: int, methods: Sequence[str], out: Path
) -> tuple[Path, float]:
    """One ``fedmed-sim`` run of ``job`` with training seed ``seed``; returns its folder and
    seconds. Only what ``methods`` need is trained (centralized, local-only, fine-tuning)."""
    app = {**cfg.app, "seed": seed}
    if "fine-tuned" not in methods:
        app["finetune-epochs"] = 0
    run = out / "runs" / f"{job}-seed{seed}"
    val_fraction = float(app.get("val-fraction", RunSettings().val_fraction))
    folders = pinned_sites(
        data.folders,
        out / "data" / f"pinned-seed{seed}",
        seed=seed,
        val_fraction=val_fraction,
        data_seed=cfg.seed,
    )
    data = dataclasses.replace(data, folders=tuple(str(f) for f in folders))
    job_cfg = dataclasses.replace(
        cfg,
        out=str(run),
        strategies=(job,),
        centralized="centralized" in methods,
        local_baselines="local-only" in methods,
        data=data,
        app=app,
    )
    started = time.monotonic()
    run_sim(job_cfg)
    return run, time.monotonic() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the missing (method, seed) results, then print the table and the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="protocol (fedmed-sim TOML)")
    p.add_argument("--data", metavar="DIR", help="an MSD folder, split by patient into sites")
    p.add_argument("--seeds", type=int, default=5, help="training seeds 0..N-1 (data fixed)")
    p.add_argument("--first-seed", type=int, default=0, help="start the seeds here")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--out", type=Path, default=Path("bench-quality"), help="run folders")
    p.add_argument("--results", type=Path, help="result JSONs (bench/results/quality/<protocol>)")
    p.add_argument("--quick", action="store_true", help="tiny protocol: checks the machinery")
    p.add_argument("--table-only", action="store_true", help="run nothing, build the table")
    p.add_argument(
        "--app",
        type=app_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run setting changed from the protocol's (a protocol of its own)",
    )
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(JOBS))
    if unknown:
        p.error(f"unknown methods {unknown}: use {','.join(METHODS)}")
    cfg, name, ident = protocol(args.config, quick=args.quick, data=args.data, overrides=args.app)
    results = args.results or RESULTS / name
    out = args.out.absolute() / name
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    configure_sim_logging(False)
    # SIGTERM (e.g. from `timeout`) stops like Ctrl-C: fedmed-sim then stops the SuperLink and Ray
    signal.signal(signal.SIGTERM, _interrupt)
    started, ran = time.monotonic(), []
    jobs = {JOBS[m][0]: [n for n in methods if JOBS[n][0] == JOBS[m][0]] for m in methods}
    data = None
    for seed in seeds if not args.table_only else ():
        for job, wanted in jobs.items():
            if all(_done(result_path(results, m, seed), ident) for m in wanted):
                continue
            data = data or _prepared(cfg, out, ident)
            run, seconds = run_job(cfg, data, job, seed, wanted, out)
            for method, result in read_results(run, job, wanted).items():
                doc = {"format": FORMAT, "method": method, "seed": seed, "protocol": ident,
                       "protocol-name": name, "run": job, "seconds": round(seconds, 1),
                       **result}  # fmt: skip
                _write_json(result_path(results, method, seed), doc)
            ran.append(f"{job}-seed{seed}")
    table = build_table(load_results(results, protocol=ident))
    print(f"protocol {name} ({ident}), results in {results}")
    print(format_table(table))
    summary = {
        "bench": "quality",
        "protocol": name,
        "protocol-hash": ident,
        "results": str(results),
        "ran": ran,
        "seconds": round(time.monotonic() - started, 1),
        "table": {
            method: {
                col: None if cell is None else {k: cell[k] for k in ("seeds", "mean", "std")}
                for col, cell in row.items()
                if col != "_seeds"
            }
            for method, row in table["rows"].items()
        },
        "goals": goals(table),
    }
    print(json.dumps(summary, sort_keys=True))
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _done(path: Path, ident: str) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("protocol") == ident
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
