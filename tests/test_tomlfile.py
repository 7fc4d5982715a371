"""One TOML reader and one error format for the federation, site, simulation and train configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedmed.simulation.config import load_sim_config

from fedmed.cli.train import _read_config
from fedmed.config import load_federation_config
from fedmed.errors import ConfigError
from fedmed.site_config import load_site_config
from fedmed.tomlfile import TomlTable, read_toml, toml_value

READERS = {
    "federation": load_federation_config,
    "site": load_site_config,
    "sim": load_sim_config,
    "train": _read_config,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_config_file_reports_a_broken_file_the_same_way(tmp_path, reader):
    # Prepare
    path = tmp_path / f"{reader}.toml"
    path.write_text("[server\nport = 1\n")
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid TOML: "):
        READERS[reader](path)
    with pytest.raises(ConfigError, match=rf"config file {tmp_path / 'no.toml'} does not exist"):
        READERS[reader](tmp_path / "no.toml")


def test_a_table_reads_typed_values_and_refuses_unknown_keys():
    # Prepare
    table = TomlTable(Path("x.toml"), "sim", {"sites": 3, "lr": 1, "flag": True, "sitse": 2})
    # Execute / Assert
    assert table.get("sites", int) == 3
    assert table.get("lr", float) == 1.0 and isinstance(table.get("lr", float), float)
    assert table.get("seed", int, 7) == 7
    with pytest.raises(ConfigError, match=r"x.toml: \[sim\] flag = True must be int"):
        table.get("flag", int)
    with pytest.raises(ConfigError, match=r"x.toml: \[sim\] rounds is missing: add it"):
        table.get("rounds", int)
    with pytest.raises(ConfigError, match=r"x.toml: \[sim\] has unknown key\(s\) sitse: check"):
        table.finish()


def test_a_table_that_is_not_a_table_is_named():
    with pytest.raises(ConfigError, match=r"x.toml: \[app\] must be a table"):
        TomlTable(Path("x.toml"), "app", [1, 2])


def test_the_reader_returns_the_document(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[app]\nnum-rounds = 2\nmodel = "coplenet"\n')
    assert read_toml(path) == {"app": {"num-rounds": 2, "model": "coplenet"}}


def test_a_command_line_value_is_read_as_toml_or_kept_as_text():
    assert toml_value("true") is True
    assert toml_value("0.5") == 0.5
    assert toml_value('"8,16"') == "8,16"
    assert toml_value("nr-dice") == "nr-dice"
