from __future__ import annotations

import pytest

from pipelines.errors import InputError
from sasrec.config import SASRecConfig


def test_toml_round_trip_and_overrides(tmp_path):
    config = SASRecConfig(loss="gbce", maxlen=50, dropout=0.5)
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert SASRecConfig.from_toml(path) == config
    changed = config.with_overrides(["maxlen=30", "loss=ce", "mixed_precision=true", "learning-rate=0.002"])
    assert (changed.maxlen, changed.loss, changed.mixed_precision, changed.learning_rate) == (30, "ce", True, 0.002)


@pytest.mark.parametrize(
    "overrides, field",
    [(["maxlen=0"], "maxlen"), (["loss=hinge"], "loss"), (["dropout=1.5"], "dropout"), (["hidden_units=50", "num_heads=3"], "hidden_units"),
     (["nonsense=1"], "nonsense"), (["maxlen=abc"], "maxlen")],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(InputError, match=field):
        SASRecConfig().with_overrides(overrides)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        SASRecConfig.from_toml(path)


def test_auto_loss_by_catalog_size():
    assert SASRecConfig().resolved_loss(3416) == "ce"
    assert SASRecConfig().resolved_loss(500_000) == "sampled-softmax"
    assert SASRecConfig(loss="bce").resolved_loss(500_000) == "bce"


def test_shipped_dense_and_sparse_configs_are_the_presets():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("dense", "sparse"):
        assert SASRecConfig.from_toml(configs / f"{name}.toml") == SASRecConfig.preset(name)
    assert SASRecConfig.preset_for(165.5) == "dense" and SASRecConfig.preset_for(8.9) == "sparse"


def test_attention_variant_fields_parse_from_toml_and_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[sasrec]\nattention_window = [8, 0]\nposition_bias = "relative"\n')
    config = SASRecConfig.from_toml(path)
    assert config.block_windows() == [8, 0] and config.position_bias == "relative"
    (tmp_path / "round.toml").write_text(config.to_toml())
    assert SASRecConfig.from_toml(tmp_path / "round.toml") == config
    assert SASRecConfig().with_overrides(["attention_window=4"]).block_windows() == [4, 4]
    assert SASRecConfig(attention_window=3, num_blocks=3).block_windows() == [3, 3, 3]
    assert SASRecConfig().block_windows() == [0, 0]  # global: the paper


@pytest.mark.parametrize(
    "overrides, field",
    [(["attention_similarity=l2"], "attention_similarity"), (["attention_normalisation=max"], "attention_normalisation"),
     (["position_bias=alibi"], "position_bias"), (["attention_window=-1"], "attention_window"),
     (["attention_window=[1, 2, 3]"], "attention_window"), (["attention_window=wide"], "attention_window"),
     (["attention_window=[true]"], "attention_window"), (["absolute_positions=maybe"], "absolute_positions"),
     (["position_bias=rotary", "hidden_units=6", "num_heads=2"], "position_bias"),
     (["attention_normalisation=linear", "attention_window=[0, 8]"], "attention_window"),
     (["attention_normalisation=linear", "position_bias=relative"], "position_bias"),
     (["attention_normalisation=linear", "position_bias=rotary"], "position_bias")],
)
def test_bad_attention_variant_values_are_one_line_errors_naming_the_field(overrides, field):
    with pytest.raises(InputError, match=field) as caught:
        SASRecConfig().with_overrides(overrides)
    assert "\n" not in str(caught.value)
