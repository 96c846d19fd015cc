"""Every `d2g` subcommand imports and prints its help (argparse formats help texts lazily, so a
bad one only fails when a user asks for it)."""
import pytest

from d2g_fast.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"d2g {name}" in out and "unavailable" not in out


def test_distill_help_lists_every_setting(capsys):
    from d2g_fast.train.config import field_names, flag

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    missing = [flag(n) for n in field_names() if n != "progress" and flag(n) not in out]
    assert not missing and "--no-progress" in out
