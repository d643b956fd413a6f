"""The one typed configuration of a SASRec run: model, loss, optimisation and evaluation.

Defaults follow the SASRec paper's dense-data setting (ML-1M). Shipped configurations in
``configs/*.toml`` override them; the CLI overrides a file with ``--set key=value``. The resolved
config is saved as ``config.toml`` in every run folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from pipelines.errors import InputError

LOSSES = ("bce", "ce", "sampled-softmax", "gbce")
POSITIONS = ("from_end", "from_start")
# Attention variants (issue 19; README, "Attention variants"): the first of each is today's model.
ATTENTION_SIMILARITIES = ("dot", "cosine")
ATTENTION_NORMALISATIONS = ("softmax", "silu", "linear")
POSITION_BIASES = ("none", "relative", "rotary")
PROTOCOLS = ("full", "sampled-100")  # evaluation candidates, see sasrec.evaluate
# Histories at least this long on average (ML-1M: 165) get the dense preset, shorter ones (Amazon
# Beauty: 8.9) the sparse one.
DENSE_MIN_MEAN_LENGTH = 30.0

# The shipped defaults for dense and sparse data; configs/dense.toml and configs/sparse.toml hold
# the same values with their measured results (a test keeps them equal). Their loss is `auto`: full
# softmax on the catalogs they were measured on, sampled softmax above FULL_SOFTMAX_MAX_ITEMS.
PRESETS = {
    "dense": dict(loss="auto", exclude_seen_negatives=True, maxlen=200, hidden_units=128, num_blocks=4, num_heads=1,
                  dropout=0.2, positions="from_start", init_std=0.02, batch_size=128, learning_rate=1e-3,
                  beta_2=0.999, warmup_steps=200, sliding_window_step=200, epochs=150, eval_every=2, patience=5),
    "sparse": dict(loss="auto", maxlen=50, hidden_units=128, num_blocks=2, num_heads=1, dropout=0.5, batch_size=128,
                   learning_rate=1e-3, beta_2=0.98, lr_decay="cosine", epochs=40, eval_every=5, patience=6),
}

# Above this catalog size full softmax logits (batch x positions x items) get too large to be the
# default; sampled softmax approximates it with shared negatives.
FULL_SOFTMAX_MAX_ITEMS = 50_000


@dataclass
class SASRecConfig:
    # --- model
    maxlen: int = 200
    """Longest history the model reads; longer ones keep their most recent ``maxlen`` items."""
    hidden_units: int = 50
    """Embedding and hidden size d."""
    num_blocks: int = 2
    """Stacked self-attention blocks."""
    num_heads: int = 1
    """Attention heads per block (``hidden_units`` must be divisible by it)."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and the feed-forward net (0.5 for sparse data); linear
    attention has no weight matrix to drop, so there only the embeddings and the feed-forward net."""
    norm: str = "pre"
    """``pre``: layer norm before attention and feed-forward as in the paper; ``post``: after the residual."""
    positions: str = "from_end"
    """Which position each item's learned embedding encodes: ``from_end`` (the paper: the most recent
    item always has the same position) or ``from_start`` (the first item of the window is position 0,
    so short histories also tell how far into them the user is)."""
    attention_similarity: str = "dot"
    """``dot``: scaled dot product of query and key (the paper); ``cosine``: cosine of the two times a
    learned temperature, one per block, starting at 10."""
    attention_normalisation: str = "softmax"
    """``softmax`` (the paper); ``silu``: each score through SiLU, masked keys 0, divided by the number
    of keys the query attends (HSTU): weights need not sum to 1; ``linear`` (Katharopoulos et al. 2020):
    feature maps elu(x) + 1 of queries and keys, each query's weights phi(q).phi(k_j) divided by their
    sum over the keys it attends, computed with causal prefix sums in O(L d^2) instead of O(L^2 d) (for
    histories of 1,000 and more); no attention-weight dropout, and no ``attention_window`` or
    ``position_bias`` (a bias or rotation per distance has no place in the prefix sums)."""
    attention_window: list[int] = field(default_factory=lambda: [0])
    """How many of the most recent items (itself included) each position may attend, per block from
    the bottom: one value for every block or one per block; 0 = all earlier items (the paper). E.g.
    ``[8, 0]``: local below, global above. A bare integer means every block."""
    position_bias: str = "none"
    """``none``; ``relative``: a learned bias per head and distance bucket (log-bucketed as in T5) added
    to the attention scores; ``rotary``: rotary position embeddings (RoPE) on queries and keys."""
    absolute_positions: bool = True
    """Add the learned absolute position embedding (``positions``) to the items; false leaves position
    to ``position_bias`` and ``attention_window`` alone."""
    time_bias: bool = False
    """Add to the attention scores a learned bias per head and bucket of the time gap between query and
    key event (bucket floor(log2(1 + seconds)), 32 buckets; TiSASRec/HSTU). Reads the dataset's
    timestamps in training and evaluation, and the request's at serving; without timestamps the bias is
    0, so the model still answers. Needs real timestamps (not file order)."""
    init_std: float = 0.0
    """0: Glorot-normal weights (the paper's reference code); > 0: normal(0, init_std) for embeddings
    and dense kernels (GPT-2 / RecBole style, e.g. 0.02)."""

    # --- loss
    loss: str = "auto"
    """``bce`` (paper: one negative per position), ``ce`` (full softmax), ``sampled-softmax``, ``gbce``;
    ``auto`` picks ``ce`` up to 50,000 items and ``sampled-softmax`` above."""
    num_negatives: int = 256
    """Negatives shared across the batch for ``sampled-softmax`` and ``gbce``."""
    negative_sampling: str = "uniform"
    """``uniform`` or ``popularity`` (training counts) for ``sampled-softmax``."""
    logq_correction: bool = True
    """Subtract log sampling probability from negative logits (``sampled-softmax`` with ``popularity``)."""
    gbce_t: float = 0.75
    """Calibration parameter t of gBCE (gSASRec)."""
    exclude_seen_negatives: bool = False
    """``ce`` and ``sampled-softmax``: leave the user's other training items out of the softmax, so the
    model is not pushed away from items it will never be asked to rank (evaluation and serving remove
    seen items). SASRec+ with 3000 negatives (Klenitskiy & Vasilev 2023) draws negatives this way.
    Like ``num_negatives``, other losses ignore it."""

    # --- optimisation
    batch_size: int = 128
    learning_rate: float = 1e-3
    beta_1: float = 0.9
    beta_2: float = 0.98
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) when > 0."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay: str = "none"
    """``none`` or ``cosine`` (to 0 over all epochs)."""
    epochs: int = 200
    sliding_window_step: int = 0
    """0: one window per user, the last maxlen+1 training items (paper). N > 0: also earlier full windows
    ending every N items before the last one; a history's earliest remainder of fewer than N items is not
    trained on. At most ``maxlen``, or the events between windows are never trained on either."""
    length_bucketing: bool = True
    """Cut each batch to its longest history (rounded up to 4, 8, 16 or a multiple of 16) instead of always
    maxlen: the same result (padding is masked and positions do not move) with less work on short histories."""
    seed: int = 42

    # --- evaluation during training
    eval_every: int = 1
    """Epochs between validation runs (NDCG@10 on ``val_protocol``)."""
    val_protocol: str = "full"
    """Validation candidates: ``full`` (every item) or ``sampled-100`` (100 sampled negatives, for
    targets stated on that protocol)."""
    patience: int = 10
    """Validation runs without improvement before early stopping (0 disables)."""
    stop_at_ndcg: float = 0.0
    """Stop as soon as validation NDCG@10 reaches this (0: off): time-to-quality runs."""
    eval_batch_size: int = 256
    """Users scored per batch in evaluation; fewer on large catalogs, so that one batch's scores over
    every item stay bounded (``sasrec.catalog.SCORES_BYTES``)."""
    eval_max_users: int = 0
    """Validation and the final test evaluation use a seeded sample (``eval_seed``) of this many users;
    0: every user with a held-out item. The full protocol scores every item for every user, which on a
    catalog of a million items takes milliseconds per user (BENCHMARKS.md, section catalog)."""
    eval_seed: int = 0
    """Seed of the evaluation's own random choices (the sampled-100 negatives), never the training
    ``seed``: runs trained with different seeds are compared on the same candidates."""

    # --- execution
    jit_compile: bool = True
    """XLA-compile the train and predict steps."""
    mixed_precision: bool = False
    """Compute in bfloat16 with float32 weights."""
    tensorboard: bool = True
    """Write TensorBoard logs to RUN/tensorboard (needs TensorFlow installed)."""

    def __post_init__(self) -> None:
        if isinstance(self.attention_window, int) and not isinstance(self.attention_window, bool):
            self.attention_window = [self.attention_window]  # one integer: every block
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> InputError:
            return InputError(f"config field '{name}': {why} (got {getattr(self, name)!r})")

        for name in ("maxlen", "hidden_units", "num_blocks", "num_heads", "batch_size", "epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.hidden_units % self.num_heads:
            raise bad("hidden_units", f"must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.norm not in ("pre", "post"):
            raise bad("norm", "must be 'pre' or 'post'")
        if self.positions not in POSITIONS:
            raise bad("positions", f"must be one of {', '.join(POSITIONS)}")
        if self.attention_similarity not in ATTENTION_SIMILARITIES:
            raise bad("attention_similarity", f"must be one of {', '.join(ATTENTION_SIMILARITIES)}")
        if self.attention_normalisation not in ATTENTION_NORMALISATIONS:
            raise bad("attention_normalisation", f"must be one of {', '.join(ATTENTION_NORMALISATIONS)}")
        if self.position_bias not in POSITION_BIASES:
            raise bad("position_bias", f"must be one of {', '.join(POSITION_BIASES)}")
        if self.position_bias == "rotary" and (self.hidden_units // self.num_heads) % 2:
            raise bad("position_bias", f"rotary needs an even head size, hidden_units / num_heads = "
                      f"{self.hidden_units // self.num_heads}")
        window = self.attention_window
        if (not isinstance(window, list) or not window
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in window)):
            raise bad("attention_window", "must be an integer >= 0 or a list of them (0: global)")
        if len(window) not in (1, self.num_blocks):
            raise bad("attention_window", f"needs one value or one per block (num_blocks={self.num_blocks})")
        if self.attention_normalisation == "linear":
            if any(window):
                raise bad("attention_window", "must be 0 with attention_normalisation 'linear' (its prefix sums "
                          "cover every earlier item)")
            if self.position_bias != "none":
                raise bad("position_bias", "must be 'none' with attention_normalisation 'linear' (a bias or "
                          "rotation per distance does not pass through its feature map)")
        if self.time_bias and self.attention_normalisation == "linear":
            raise bad("time_bias", "must be false with attention_normalisation 'linear' (a bias per pair of "
                      "events has no place in its prefix sums)")
        if self.val_protocol not in PROTOCOLS:
            raise bad("val_protocol", f"must be one of {', '.join(PROTOCOLS)}")
        if not 0.0 <= self.stop_at_ndcg <= 1.0:
            raise bad("stop_at_ndcg", "must be in [0, 1]")
        if self.init_std < 0:
            raise bad("init_std", "must be >= 0")
        if self.loss not in LOSSES + ("auto",):
            raise bad("loss", f"must be one of {', '.join(LOSSES + ('auto',))}")
        if self.negative_sampling not in ("uniform", "popularity"):
            raise bad("negative_sampling", "must be 'uniform' or 'popularity'")
        if self.lr_decay not in ("none", "cosine"):
            raise bad("lr_decay", "must be 'none' or 'cosine'")
        if self.num_negatives < 1:
            raise bad("num_negatives", "must be >= 1")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be > 0")
        if self.eval_batch_size < 1:
            raise bad("eval_batch_size", "must be >= 1")
        if self.eval_max_users < 0:
            raise bad("eval_max_users", "must be >= 0 (0: every user)")
        if self.sliding_window_step < 0 or self.patience < 0 or self.warmup_steps < 0:
            raise InputError("config fields 'sliding_window_step', 'patience', 'warmup_steps' must be >= 0")

    def block_windows(self) -> list[int]:
        """``attention_window`` for each block, bottom first (0: global)."""
        return list(self.attention_window) * (self.num_blocks // len(self.attention_window))

    def resolved_loss(self, num_items: int) -> str:
        """The loss actually used: ``auto`` becomes ``ce`` or ``sampled-softmax`` by catalog size."""
        if self.loss != "auto":
            return self.loss
        return "ce" if num_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled-softmax"

    @classmethod
    def preset(cls, name: str) -> "SASRecConfig":
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @staticmethod
    def preset_for(mean_length: float) -> str:
        """``dense`` for long average histories, ``sparse`` for short ones."""
        return "dense" if mean_length >= DENSE_MIN_MEAN_LENGTH else "sparse"

    # --- serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "SASRecConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"{source}: unknown config field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        hints = typing.get_type_hints(cls)
        coerced = {key: _coerce(key, hints[key], value, source) for key, value in values.items()}
        return cls(**coerced)

    @classmethod
    def from_toml(cls, path: str | Path) -> "SASRecConfig":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: invalid TOML: {exc}") from None
        # Shipped configs keep their measured results in a [results] table; only [sasrec] or the
        # top level holds settings.
        values = values.get("sasrec", {k: v for k, v in values.items() if not isinstance(v, dict)})
        return cls.from_dict(values, source=str(path))

    def to_toml(self) -> str:
        return tomli_w.dumps({"sasrec": self.to_dict()})

    def with_overrides(self, assignments: list[str]) -> "SASRecConfig":
        """Apply ``key=value`` strings (CLI ``--set``), values parsed as TOML scalars or bare strings."""
        values = self.to_dict()
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                raise InputError(f"--set {assignment!r}: expected key=value")
            try:
                values[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                values[key] = raw.strip()
        return SASRecConfig.from_dict(values, source="--set")


def _coerce(key: str, hint, value, source: str):
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint == list[int]:
        # One integer stands for every block; validate() checks the values.
        values = [value] if not isinstance(value, list) else value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return list(values)
        raise InputError(f"{source}: config field '{key}' must be an integer or a list of integers, got {value!r}")
    raise InputError(f"{source}: config field '{key}' must be {hint.__name__}, got {value!r}")

