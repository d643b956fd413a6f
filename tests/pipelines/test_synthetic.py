from __future__ import annotations

import numpy as np

from pipelines.prepare import prepare
from pipelines.readers import read_interactions
from pipelines.synthetic import chain_successors, generate, write_log


def test_seeded_determinism_and_defaults():
    a, b = generate(seed=3), generate(seed=3)
    assert a.equals(b) and not a.equals(generate(seed=4))
    assert a["user_id"].nunique() == 2000 and a["item_id"].nunique() == 500
    lengths = a.groupby("user_id").size()
    assert lengths.min() >= 20 and lengths.max() <= 60
    assert (a.groupby("user_id")["timestamp"].diff().dropna() > 0).all()


def test_chain_oracle_beats_popularity_by_far(tmp_path):
    path = write_log(generate(seed=1), tmp_path / "log.csv")
    frame = read_interactions("csv", path, user_col="user_id", item_col="item_id", time_col="timestamp")
    ds = prepare(frame, kcore="none")
    successor = chain_successors(seed=1)
    item_number = np.array([0, 0] + [int(x) for x in ds.item_ids[2:]])  # internal -> external id
    internal = {int(x): i for i, x in enumerate(ds.item_ids) if i >= 2}
    popular = np.argsort(-ds.train_counts, kind="stable")[:10]
    oracle_hits = pop_hits = 0
    for u in range(ds.num_users):
        seq = ds.user_items(u)
        history, target = seq[: ds.valid_end[u]], seq[ds.valid_end[u]]
        oracle_hits += target == internal[successor[item_number[history[-1]]]]
        pop_hits += target in popular
    oracle_hr, pop_hr = oracle_hits / ds.num_users, pop_hits / ds.num_users
    assert oracle_hr > 0.85 and pop_hr < 0.06 and oracle_hr > 10 * pop_hr


def test_a_log_in_parts_is_deterministic_with_consecutive_users_and_the_same_chains(tmp_path, cli):
    code, out, _ = cli("synth", "--out", tmp_path / "a", "--users", 50, "--items", 40, "--chains", 2, "--parts", 4,
                       "--file-format", "parquet", "--seed", 7)
    assert code == 0 and "4 parquet files, 50 users" in out
    cli("synth", "--out", tmp_path / "b", "--users", 50, "--items", 40, "--chains", 2, "--parts", 4, "--file-format", "parquet", "--seed", 7)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(4)]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    frame = read_interactions("parquet", tmp_path / "a", user_col="user_id", item_col="item_id", time_col="timestamp")
    users = frame["user_id"].astype(int).to_numpy()
    assert sorted(set(users)) == list(range(1, 51)) and np.all(np.diff(users) >= 0)  # parts hold consecutive users
    successor = chain_successors(items=40, chains=2, seed=7)
    items = frame["item_id"].astype(int).to_numpy()
    same_user = users[1:] == users[:-1]
    follows = (successor[items[:-1]] == items[1:])[same_user].mean()
    assert follows > 0.8  # every part walks the seed's chains (noise 0.1)
    code, _, err = cli("synth", "--out", tmp_path / "c", "--users", 3, "--parts", 5)
    assert code == 2 and "--parts must be between 1 and --users (3), got 5" in err


def test_a_power_law_catalog_has_a_long_tail_and_keeps_the_chains():
    flat = generate(users=3000, items=5000, chains=250, seed=2)
    tail = generate(users=3000, items=5000, chains=250, seed=2, popularity=1.0, noise=0.3)
    assert flat.equals(generate(users=3000, items=5000, chains=250, seed=2, popularity=0.0))  # the default is unchanged

    def top_share(frame):  # share of events on the 1% most frequent items
        counts = np.sort(frame["item_id"].value_counts().to_numpy())[::-1]
        return counts[: 50].sum() / counts.sum()

    assert top_share(flat) < 0.03 and top_share(tail) > 0.15
    successor = chain_successors(items=5000, chains=250, seed=2)
    users, items = tail["user_id"].to_numpy(), tail["item_id"].to_numpy()
    same_user = users[1:] == users[:-1]
    assert (successor[items[:-1]] == items[1:])[same_user].mean() > 0.65  # 1 - noise, plus lucky jumps
