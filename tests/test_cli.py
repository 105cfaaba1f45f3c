import importlib

import pytest

from visae import cli


def test_usage_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_is_an_error(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_main_and_help(name, capsys):
    module = importlib.import_module(cli.SUBCOMMANDS[name][0])
    assert callable(getattr(module, "main", None)), f"{module.__name__} has no main()"
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out
