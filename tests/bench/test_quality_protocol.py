"""bench/quality.py's protocol identity: the shipped protocol keeps the hash its committed
results carry, and a changed run setting (``--app``) is a protocol of its own."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fedmed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
assert spec is not None and spec.loader is not None
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality
spec.loader.exec_module(quality)


def _committed_hash() -> str:
    result = ROOT / "bench" / "results" / "quality" / "quality" / "fedavg-seed0.json"
    return json.loads(result.read_text(encoding="utf-8"))["protocol"]


def test_the_shipped_protocol_keeps_the_hash_of_its_committed_results():
    _, name, ident = quality.protocol(quality.CONFIG, quick=False, data=None)
    assert (name, ident) == ("quality", _committed_hash())


def test_a_changed_run_setting_is_a_protocol_of_its_own():
    overrides = [
        quality.app_override("loss=nr-dice"),
        quality.app_override("self-ensembling=true"),
    ]
    cfg, name, ident = quality.protocol(quality.CONFIG, quick=False, data=None, overrides=overrides)
    assert name == "quality-loss-nr-dice-self-ensembling-true"
    assert (cfg.app["loss"], cfg.app["self-ensembling"]) == ("nr-dice", True)
    assert ident != _committed_hash()


def test_settings_that_do_not_go_together_are_refused_before_any_run():
    overrides = [quality.app_override("loss=dice"), quality.app_override("self-ensembling=true")]
    with pytest.raises(ConfigError, match="self-ensembling"):
        quality.protocol(quality.CONFIG, quick=False, data=None, overrides=overrides)


def test_an_override_without_a_value_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        quality.app_override("loss")
