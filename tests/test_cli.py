"""The flags every script shares (comic.cli)."""

from __future__ import annotations

import argparse

import pytest

from comic import cli


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(parents=[cli.config_flags("smoke"), cli.seeds_flag(None, "seeds")])


def test_overrides_go_before_the_seeds_or_after_a_double_dash(capsys):
    args = cli.parse(_parser(), ["rlc.tau=0.8", "--seeds", "0", "1"])
    assert args.seeds == [0, 1] and args.overrides == ["rlc.tau=0.8"]
    args = cli.parse(_parser(), ["--seeds", "3", "4", "--", "rlc.tau=0.8"])
    assert args.seeds == [3, 4] and args.overrides == ["rlc.tau=0.8"]
    with pytest.raises(SystemExit) as stop:
        cli.parse(_parser(), ["--seeds", "0", "1", "rlc.tau=0.8"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "'rlc.tau=0.8' is not a seed" in err and "end the seed list with --" in err
