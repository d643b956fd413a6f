"""The attention benchmark's variants are valid before a full run spends an hour on one."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.attention import VARIANTS, main
from sasrec.config import SASRecConfig


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_a_valid_config_of_both_presets(name):
    for preset in ("dense", "sparse"):
        config = dataclasses.replace(SASRecConfig.preset(preset), **VARIANTS[name])
        config.validate()
        for field, value in VARIANTS[name].items():
            assert getattr(config, field) == value


def test_every_variant_name_can_be_asked_for_on_the_command_line(capsys):
    # --variants is comma-separated: a name with a comma could never be run.
    assert not [name for name in VARIANTS if "," in name]
    with pytest.raises(SystemExit):
        main(["--variants", "no such variant"])
    assert "unknown variant(s) no such variant" in capsys.readouterr().err
