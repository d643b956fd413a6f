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


def test_seeds_run_apart_count_together_in_the_mean():
    from benchmarks.attention import with_seed_means

    def run(seed, ndcg):
        return {"variant": "deep", "seed": seed, "test HR@10": 0.3, "test NDCG@10": ndcg, "best val NDCG@10": 0.2}

    earlier = [  # as read back from BENCHMARKS.md: text cells, an old mean, another variant
        {"variant": "deep", "seed": "42", "test HR@10": "0.3", "test NDCG@10": "0.2300", "best val NDCG@10": "0.2"},
        {"variant": "deep", "seed": "1", "test HR@10": "0.3", "test NDCG@10": "0.1000", "best val NDCG@10": "0.2"},
        {"variant": "deep", "seed": "mean of 2", "test NDCG@10": "0.1500 (spread 0.1000)"},
        {"variant": "wide", "seed": "42", "test HR@10": "0.3", "test NDCG@10": "0.5", "best val NDCG@10": "0.2"},
    ]
    rows = with_seed_means([run(1, 0.19), run(2, 0.21)], earlier)
    assert [row["seed"] for row in rows] == [1, 2, "42", "mean of 3"]  # seed 1 rerun replaces its old row
    assert rows[-1]["test NDCG@10"] == "0.2100 (spread 0.0400)"
    assert with_seed_means([run(2, 0.21)], [])[-1]["seed"] == 2  # one seed: no mean
