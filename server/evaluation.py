"""The end-of-run evaluation: the final model's validation score, and the cross-site table.

After the last round the server asks every connected site to evaluate (an ``evaluate``
message, :mod:`fedmed.client.evaluate`):

1. **Stage 1**: the final global model, and with ``cross-site-evaluation`` (the default) also
   the best one so far and the reference models (``reference-models``: the centralized
   baseline in simulation). Each site also builds its own models (fine-tuned, Ditto,
   local-only with ``local-baselines``) and evaluates everything on its validation split. The
   sites' plain validation Dice of the final model scores the last round (model selection
   stays on validation data, :mod:`.selection`); if the final model becomes the best, the
   entries of "global-best" are the final model's.
2. The server evaluates the global and reference models, and any site model that was allowed
   to travel, on its held-out set (the study's test set; per-case values are the server's own
   data, so its summaries have no disclosure floor).
3. **Stage 2** (only when some site's config lets its models travel, never under DP): each
   site evaluates the other sites' travelling models on its validation split.

Under DP no site is asked (what leaves a site is only what its privacy accounting covers): the
final round is not scored and the cross-site table holds the server's held-out results only.

The result is ``<out-dir>/cross_site.json``::

    {"format": "fedmed-cross-site-1", "run-id": ..., "round": R, "best-round": r,
     "sites": ["A", "B"], "missing": ["C"],
     "entries": [{"model": "global-final", "data": "val:A", "metric": "dice", "n": 12,
                  "n_undefined": 0, "status": "ok", "mean": .81, "ci_low": .76,
                  "ci_high": .85, "worst_decile": .52}, ...]}

(a site offline at the end is listed in ``missing`` and has a ``"status": "missing"`` entry per
global model), its sha256 written to the audit log, and ``cross_site.png``, a heatmap of the
mean Dice of every model on every split, drawn next to it. Any failure reading one site's reply
leaves that site out with a logged reason; the evaluation never ends the run.

Example:
    >>> run_final_evaluation(federation, final_weights)   # writes cross_site.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.numpy import load_file

from fedmed import wire
from fedmed.crosssite import summary_entries
from fedmed.errors import ConfigError
from fedmed.scoring import evaluate_folder
from fedmed.stats import TOO_FEW_CASES
from fedmed.text import is_identifier, printable

from .selection import record_selection
from .validation import check_arrays

if TYPE_CHECKING:
    from .federation import Federation

__all__ = ["CROSS_SITE_FILE", "ENTRY_KEYS", "check_entries", "run_final_evaluation"]

logger = logging.getLogger(__name__)

CROSS_SITE_FILE = "cross_site.json"
FORMAT = "fedmed-cross-site-1"
ENTRY_KEYS = frozenset(
    {"model", "data", "metric", "n", "n_undefined", "status", "mean", "ci_low", "ci_high",
     "worst_decile"}
)  # fmt: skip
_NUMBERS = ("n", "n_undefined", "mean", "ci_low", "ci_high", "worst_decile")
_MAX_ENTRIES = 10_000
Arrays = dict[str, np.ndarray]


def check_entries(text: str, *, site: str, models: set[str]) -> list[dict[str, Any]]:
    """The entries of a site's ``results``, each checked: known keys, a model the site was sent
    or its own (``<label>@<site>``), its own validation split, finite numbers. ValueError
    (printable) otherwise."""
    entries = json.loads(text)
    if not isinstance(entries, list) or len(entries) > _MAX_ENTRIES:
        raise ValueError(f"results must be a list of at most {_MAX_ENTRIES} entries")
    for entry in entries:
        if not isinstance(entry, dict) or not set(entry) <= ENTRY_KEYS:
            raise ValueError(f"an entry has unknown keys: {printable(entry, limit=120)}")
        model, data, metric = entry.get("model"), entry.get("data"), entry.get("metric")
        own = isinstance(model, str) and model.endswith(f"@{site}")
        if not (is_identifier(model) and (model in models or own)):
            raise ValueError(f"entry for model {printable(model, limit=60)}: not a model it has")
        if data != f"val:{site}" or not is_identifier(metric):
            raise ValueError(f"entry on data {printable(data, limit=60)}: not its own split")
        if entry.get("status") not in ("ok", TOO_FEW_CASES):
            raise ValueError(f"entry status {printable(entry.get('status'), limit=40)}")
        for key in _NUMBERS:
            value = entry.get(key)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"entry {key} is {printable(value, limit=40)}: not a number")
    return entries


def _message(
    fed: Federation, models: Mapping[str, Mapping[str, np.ndarray]], options: Mapping[str, Any]
) -> RecordDict:
    # FedBN (SiloBN): a site evaluates the global models with its own normalization statistics;
    # the server's copies were never trained, and sent along they would replace the site's
    arrays = wire.join_models(
        {
            label: fed.shared_weights(m) if label.startswith("global-") else m
            for label, m in models.items()
        }
    )
    # the sites' end-of-run training (fine-tuning, local-only baselines) uses the base lr,
    # not the annealed last round's (lr-schedule = cosine ends near 0)
    cfg = dataclasses.replace(fed.config(fed.settings.num_rounds), lr=fed.settings.lr)
    return RecordDict(
        {
            **wire.pack(arrays),
            "config": ConfigRecord(cfg.to_config()),
            "evaluation": ConfigRecord(dict(options)),
        }
    )


def _ask(
    fed: Federation, nodes: list[int], models: Mapping[str, Arrays], options: Mapping[str, Any]
) -> dict[int, Message]:
    content = _message(fed, models, options)
    ttl = fed.settings.evaluation_deadline
    messages = [
        Message(content, node, MessageType.EVALUATE, group_id="evaluation", ttl=ttl)
        for node in nodes
    ]
    return fed._exchange(messages, ttl)


def _read_reply(
    fed: Federation, reply: Message | None, site: str, models: set[str]
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, Arrays]]:
    """``(entries, metrics, travelling models)`` of one site's evaluate reply."""
    if reply is None:
        raise ValueError("no reply in time")
    if reply.has_error():
        raise ValueError(f"site error: {printable(reply.error.reason)}")
    content = reply.content
    entries = check_entries(
        str(content.config_records["results"]["entries"]), site=site, models=models
    )
    metrics = {
        str(k): float(v)
        for k, v in content.metric_records["metrics"].items()
        if is_identifier(k) and isinstance(v, (int, float)) and math.isfinite(v)
    }
    travelling: dict[str, Arrays] = {}
    if wire.ARRAYS in content:
        travelling = wire.split_models(wire.unpack_content(content))
        for label, arrays in travelling.items():
            if not (label.endswith(f"@{site}") and is_identifier(label)):
                raise ValueError(f"model {printable(label, limit=60)} is not the site's own")
            check_arrays(arrays, fed.initial_weights)
    return entries, metrics, travelling


def _reference_models(fed: Federation) -> dict[str, Arrays]:
    models: dict[str, Arrays] = {}
    for label, path in fed.settings.reference_model_paths.items():
        try:
            arrays = load_file(str(path))
            check_arrays(arrays, fed.initial_weights)
        except Exception as err:
            raise ConfigError(
                f"run config key 'reference-models': {label} = {str(path)!r} is not a "
                f"checkpoint of this model ({printable(err)}): give a safetensors state_dict"
            ) from err
        models[label] = arrays
    return models


def _holdout_entries(fed: Federation, models: Mapping[str, Arrays]) -> list[dict[str, Any]]:
    if not fed.settings.data_dir:
        return []
    cfg = fed.config(fed.settings.num_rounds)
    entries: list[dict[str, Any]] = []
    for label, arrays in models.items():
        result = evaluate_folder(arrays, fed.settings.data_dir, cfg, adapt_norm=cfg.fedbn)
        entries += summary_entries(label, "holdout", result["cases"], floor=1)
    return entries


def _stage(
    fed: Federation,
    nodes: list[int],
    models: Mapping[str, Arrays],
    options: Mapping[str, Any],
    result: dict[str, Any],
) -> tuple[dict[str, dict[str, float]], dict[str, Arrays]]:
    """Ask ``nodes`` to evaluate ``models``; add their entries to ``result``."""
    replies = _ask(fed, nodes, models, options)
    metrics: dict[str, dict[str, float]] = {}
    travelling: dict[str, Arrays] = {}
    for node in nodes:
        site = fed.roster.name_of(node)
        try:
            entries, site_metrics, site_models = _read_reply(
                fed, replies.get(node), site, set(models)
            )
        except Exception as err:  # one site's reply never ends the evaluation
            logger.warning("end-of-run evaluation: site %s left out (%s)", site, printable(err))
            result["failed"][site] = printable(err)
            continue
        result["entries"] += entries
        metrics[site] = site_metrics
        travelling.update(site_models)
    return metrics, travelling


def run_final_evaluation(
    fed: Federation, weights: Mapping[str, np.ndarray], *, last_round: int | None = None
) -> dict[str, Any]:
    """Score the final round (``last_round``, default ``num-rounds``; earlier when the run
    stopped, e.g. on the sites' privacy budgets) on the sites' validation splits and, with
    ``cross-site-evaluation``, write the cross-site table (see the module docstring)."""
    settings = fed.settings
    cross = settings.cross_site_evaluation
    last = settings.num_rounds if last_round is None else last_round
    connected = set(fed.grid.get_node_ids())
    nodes = sorted(n for n in fed.sites if n in connected)
    if fed.guard.dp.enabled:  # under DP nothing beyond the accounted updates leaves a site
        logger.info("end-of-run evaluation: DP is on, the sites are not asked")
        nodes = []
    models: dict[str, Arrays] = {"global-final": dict(weights)}
    best = fed.store.best_pointer()
    best_round = best["round"] if best else None
    if cross:
        if best_round is not None and best_round != last:
            models["global-best"] = fed.store.load(best_round).weights
        models.update(_reference_models(fed))
    options = {
        "own-models": cross,
        "finetune-epochs": settings.finetune_epochs,
        "local-baseline": settings.local_baselines,
        "send-models": cross and settings.dp_clip_norm == 0,
    }
    result: dict[str, Any] = {"entries": [], "failed": {}}
    metrics, travelling = _stage(fed, nodes, models, options, result) if nodes else ({}, {})
    record: dict[str, Any] = {"round": last, "status": "evaluation", "sites": {}}
    # the sites' scores of the final model, named as the per-round pre-training scores are
    finals = {
        site: {
            f"global-{k[len('global-final-') :]}": v
            for k, v in m.items()
            if k.startswith("global-final-")
        }
        for site, m in metrics.items()
    }
    record_selection(fed.store, record, last, sites=finals, audit=fed.guard)
    best = fed.store.best_pointer()
    best_round = best["round"] if best else None
    fed.log.append({**record, "failed": result["failed"]})
    if not cross:
        return result
    if best_round == last:  # the final model is the best: its entries stand for both
        models.pop("global-best", None)
        result["entries"] = [e for e in result["entries"] if e["model"] != "global-best"]
        result["entries"] += [
            {**e, "model": "global-best"} for e in result["entries"] if e["model"] == "global-final"
        ]
    result["entries"] += _holdout_entries(fed, {**models, **travelling})
    if best_round == last and settings.data_dir:
        result["entries"] += [
            {**e, "model": "global-best"}
            for e in result["entries"]
            if e["model"] == "global-final" and e["data"] == "holdout"
        ]
    if travelling:
        for node in nodes:
            site = fed.roster.name_of(node)
            others = {k: v for k, v in travelling.items() if not k.endswith(f"@{site}")}
            if others:
                _stage(fed, [node], others, {"own-models": False}, result)
    _write(fed, result, nodes, last, best_round)
    return result


def _write(
    fed: Federation, result: dict[str, Any], nodes: list[int], last: int, best_round: int | None
) -> None:
    asked = {fed.roster.name_of(n) for n in nodes}
    missing = sorted({s.name for s in fed.sites.values()} - asked | set(result["failed"]))
    entries = result["entries"] + [
        {"model": model, "data": f"val:{site}", "status": "missing"}
        for site in missing
        for model in ("global-final", "global-best")
    ]
    payload = {
        "format": FORMAT,
        "run-id": fed.run_id,
        "round": last,
        "best-round": best_round,
        "sites": sorted(asked - set(result["failed"])),
        "missing": missing,
        "entries": entries,
    }
    out = fed.settings.out_path
    path = out / CROSS_SITE_FILE
    blob = (json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".cross_site.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
    os.replace(tmp, path)
    fed.guard.record_file("cross-site", path, hashlib.sha256(blob).hexdigest())
    draw_heatmap(entries, out / "cross_site.png")
    logger.info("cross-site evaluation: %d entries in %s", len(entries), path)


def draw_heatmap(entries: list[Mapping[str, Any]], path: Path, *, metric: str = "dice") -> None:
    """Mean ``metric`` of every model (rows) on every split (columns); blank where a summary is
    withheld (too few cases) or missing."""
    rows = sorted({e["model"] for e in entries})
    cols = sorted({e["data"] for e in entries}, key=lambda d: (d != "holdout", d))
    grid = np.full((max(1, len(rows)), max(1, len(cols))), np.nan)
    notes: dict[tuple[int, int], str] = {}
    for e in entries:
        if e.get("metric", metric) != metric:
            continue
        i, j = rows.index(e["model"]), cols.index(e["data"])
        if e.get("status") == "ok":
            grid[i, j] = e["mean"]
            notes[i, j] = f"{e['mean']:.2f}"
        else:
            notes[i, j] = "n<floor" if e.get("status") == TOO_FEW_CASES else "missing"
    fig = Figure(figsize=(1.6 + 1.1 * len(cols), 1.0 + 0.45 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize="small")
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    for (i, j), text in notes.items():
        ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color="white")
    ax.set_title(f"cross-site evaluation: mean {metric}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path)
