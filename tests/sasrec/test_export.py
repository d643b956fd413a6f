"""SavedModel export: the history rule in the graph matches the Keras model, and the export is
self-contained, versioned and atomic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.serving.conftest import keras_model, model_base, recommender, run_dir, vocab  # noqa: F401
from tests.serving.helpers import item_names, make_run, reference_topk


def random_histories(rng, n, names, maxlen):
    histories = []
    for _ in range(n):
        length = int(rng.integers(1, 3 * maxlen))
        picks = [names[i] for i in rng.integers(0, len(names), length)]
        # Unknown ids sprinkled in: they must be ignored and counted.
        for pos in rng.integers(0, length + 1, int(rng.integers(0, 3))):
            picks.insert(int(pos), f"unknown-{pos}")
        histories.append(picks)
    return histories


def test_savedmodel_matches_keras_on_100_random_histories(recommender, keras_model, vocab):
    rng = np.random.default_rng(7)
    names = item_names(len(vocab) - 2)
    histories = random_histories(rng, 100, names, keras_model.maxlen)
    k = 10
    for exclude_seen in (True, False):
        out = recommender.recommend_batch(histories, k=k, exclude_seen=exclude_seen)
        for i, history in enumerate(histories):
            ids, scores = reference_topk(keras_model, vocab, history, k, exclude_seen)
            got = out.row(i)
            assert got.item_ids == ids, (i, exclude_seen)
            np.testing.assert_allclose([s for _, s in got.items], scores, atol=1e-4, rtol=0)
            assert got.unknown_count == sum(h.startswith("unknown-") for h in history)
            assert not got.cold_start


def test_exclusions_and_padding_never_returned(recommender, keras_model, vocab):
    names = item_names(len(vocab) - 2)
    history = names[:5]
    exclude = names[5:15] + ["not-an-item", ""]
    got = recommender.recommend(history, k=10, exclude_item_ids=exclude)
    ids, scores = reference_topk(keras_model, vocab, history, 10, True, exclude)
    assert got.item_ids == ids
    assert not set(got.item_ids) & (set(history) | set(exclude) | {"", "<oov>"})
    # Every item left: k = all items, minus the excluded ones; the signature pads with "" / -inf.
    everything = recommender.recommend(history, k=recommender.max_k, exclude_item_ids=exclude)
    assert len(everything.items) == recommender.num_items - 5 - 10
    raw = recommender.recommend_batch([history], k=recommender.max_k, exclude_item_ids=[exclude])
    assert (raw.item_ids[0, -15:] == "").all() and np.isneginf(raw.scores[0, -15:]).all()


@pytest.mark.parametrize("history", [[], ["nope", "", "also-unknown"]])
def test_cold_start_returns_popularity(recommender, run_dir, history):
    from pipelines.dataset import read_items

    item_ids, _, train_counts = read_items(run_dir / "dataset")
    got = recommender.recommend(history, k=5)
    assert got.cold_start
    assert got.unknown_count == sum(1 for h in history if h)
    order = np.argsort(-train_counts[2:], kind="stable")[:5] + 2
    assert got.item_ids == [item_ids[i] for i in order]
    assert got.items[0][1] == pytest.approx(train_counts[order[0]] / train_counts[2:].sum(), rel=1e-5)


def test_truncates_to_most_recent_maxlen(recommender, keras_model, vocab):
    names = item_names(len(vocab) - 2)
    maxlen = keras_model.maxlen
    recent = names[:maxlen]
    long = names[maxlen : maxlen + 7] + recent
    a = recommender.recommend(long, k=5, exclude_seen=False)
    b = recommender.recommend(recent, k=5, exclude_seen=False)
    assert a.item_ids == b.item_ids
    np.testing.assert_allclose([s for _, s in a.items], [s for _, s in b.items], atol=1e-5)


def test_sequence_widths():
    from sasrec.model_base import sequence_widths

    assert sequence_widths(200) == [50, 100, 200]
    assert sequence_widths(400) == [100, 200, 400]
    assert sequence_widths(50) == [25, 50]
    assert sequence_widths(31) == [16, 31]
    assert sequence_widths(12) == [12]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model with maxlen 40, scored at width 20 or 40 (XLA on): (Recommender, Keras model, vocab)."""
    from pipelines.dataset import read_items
    from sasrec.export import export_run
    from sasrec.run import RunFolder
    from sasrec.recommender import Recommender

    run = make_run(tmp_path_factory.mktemp("wide") / "run", maxlen=40, seed=3)
    base = tmp_path_factory.mktemp("wide-models") / "m"
    export_run(run, base, jit_compile=True)
    return Recommender.load(base), RunFolder(run).load_best(), read_items(run / "dataset")[0]


def test_short_batches_are_scored_at_a_smaller_width_with_the_same_answer(wide):
    """A batch whose longest known history fits width 20 is scored at 20, not maxlen 40: every score
    matches the Keras model on the full-width window, and a row's answer does not depend on the
    other rows of its batch."""
    rec, keras_model, vocab = wide
    assert rec.card["sequence_widths"] == [20, 40]
    names = item_names(len(vocab) - 2)
    rng = np.random.default_rng(11)
    short = [[names[i] for i in rng.integers(0, len(names), n)] + ["unknown-x"] * (n % 3)
             for n in rng.integers(1, 21, 12)]
    long = [names[i] for i in rng.integers(0, len(names), 35)]
    alone = rec.recommend_batch(short, k=10)
    mixed = rec.recommend_batch(short + [long], k=10)
    for i, history in enumerate(short):
        ids, scores = reference_topk(keras_model, vocab, history, 10)
        for out in (alone, mixed):
            assert out.row(i).item_ids == ids, i
            np.testing.assert_allclose([s for _, s in out.row(i).items], scores, atol=1e-4, rtol=0)
    ids, scores = reference_topk(keras_model, vocab, long, 10)
    assert mixed.row(len(short)).item_ids == ids
    np.testing.assert_allclose([s for _, s in mixed.row(len(short)).items], scores, atol=1e-4, rtol=0)


def test_model_card(model_base, run_dir):
    card = json.loads((model_base / "1" / "assets" / "model_card.json").read_text())
    for key in ("config", "data_manifest", "metrics", "popularity", "max_k", "maxlen", "exported_at", "source_run"):
        assert key in card, key
    assert card["maxlen"] == 12 and card["max_k"] == card["num_items"] == 40
    assert card["sequence_widths"] == [12]
    assert card["metrics"]["protocol"]["split"] == "leave-one-out"
    assert card["source_run"] == str(run_dir.resolve())
    assert len(card["popularity"]["items"]) == 40


def test_loads_without_project_code(model_base):
    """Plain `tf.saved_model.load` in a process where sasrec/pipelines/serving cannot be imported."""
    script = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("sasrec", "pipelines", "serving", "tests"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import tensorflow as tf
        fn = tf.saved_model.load({str(model_base / "1")!r}).signatures["serving_default"]
        out = fn(history=tf.constant([["item-0003", "zz", ""]]), k=tf.constant(3),
                 exclude_seen=tf.constant(True), exclude_item_ids=tf.constant([["item-0004"]]))
        assert out["item_ids"].shape == (1, 3), out
        assert int(out["unknown_count"][0]) == 1
        print("OK", [x.decode() for x in out["item_ids"].numpy()[0]])
        """
    )
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_versions_are_new_folders_and_atomic(run_dir, tmp_path, recommender):
    from sasrec.export import export_run
    from sasrec.model_base import list_versions
    from sasrec.recommender import Recommender

    base = tmp_path / "m"
    assert export_run(run_dir, base, jit_compile=False).name == "1"
    assert export_run(run_dir, base, jit_compile=False).name == "2"
    assert list_versions(base) == [1, 2]
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # no temporary folder left
    rec = Recommender.load(base)
    assert rec.version == 2 and not rec.xla
    # The non-XLA export gives the same answers as the XLA one.
    a = rec.recommend(item_names(40)[:6], k=8)
    b = recommender.recommend(item_names(40)[:6], k=8)
    assert a.item_ids == b.item_ids
    np.testing.assert_allclose([s for _, s in a.items], [s for _, s in b.items], atol=1e-4)


def test_failed_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import tensorflow as tf

    from sasrec.export import export_run

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    base = tmp_path / "m"
    with pytest.raises(OSError):
        export_run(run_dir, base)
    assert list(base.iterdir()) == []


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    from sasrec.cli import main

    assert main(["export", "--run", str(tmp_path / "missing"), "--model-base", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "run folder not found" in err and len(err.strip().splitlines()) == 1


def test_a_mixed_precision_model_serves_float32_scores(tmp_path):
    """Trained with mixed_precision, the SavedModel still ranks by float32 scores: no bfloat16 ties."""
    import keras
    import tensorflow as tf

    from sasrec.config import SASRecConfig
    from sasrec.export import export_model
    from sasrec.model import build_model
    from sasrec.recommender import Recommender

    vocab = np.array(["", "<oov>", *item_names(3000)], dtype=object)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = build_model(SASRecConfig(maxlen=12, hidden_units=32), len(vocab))
        base = export_model(model, tmp_path / "models", item_ids=vocab, train_counts=np.arange(len(vocab)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rec = Recommender.load(base)
    for history in (list(vocab[2:8]), list(vocab[100:112])):
        got = np.array([score for _, score in rec.recommend(history, k=20)])
        expected, scores = reference_topk(model, vocab, history, 20)
        assert len(set(got)) == 20
        # float32 scores, not bfloat16 values widened: most are not representable in bfloat16.
        assert np.mean(got.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32) != got) > 0.5
        # The graph and the eager Keras model run different bfloat16 kernels (oneDNN's native bfloat16
        # on CPUs that have it): they agree to bfloat16's precision (2^-8 relative), not to float32's.
        np.testing.assert_allclose(got, scores, rtol=2e-2, atol=1e-3)
