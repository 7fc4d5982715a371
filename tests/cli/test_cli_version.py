"""Every fedmed command says its version and the Flower it runs on (``--version``)."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from fedmed.client.cli import main as client_main
from fedmed.server.cli import main as server_main
from fedmed.simulation.cli import build_parser

from fedmed import __version__
from fedmed.cli.main import main as fedmed_main


@pytest.mark.parametrize(
    ("prog", "run"),
    [
        ("fedmed", fedmed_main),
        ("fedmed-server", server_main),
        ("fedmed-client", client_main),
        ("fedmed-sim", lambda argv: build_parser().parse_args(argv)),
    ],
    ids=["fedmed", "server", "client", "sim"],
)
def test_every_command_prints_its_version(prog, run, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        run(["--version"])
    assert exit_.value.code == 0
    expected = f"{prog} (fedmed {__version__}, flwr {version('flwr')})"
    assert capsys.readouterr().out.strip() == expected
