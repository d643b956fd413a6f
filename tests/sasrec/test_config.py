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
