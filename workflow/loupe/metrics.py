"""The evaluation's vocabulary, written once: every key a layer's eval.json shares with
metrics.csv, in the CSV's column order, with what it means. evaluate writes these keys, summary
writes them as columns (then the training run's last line), and the model card shows the
metrics among them with these descriptions. A leaf module: it imports nothing of the package.

The names are a published format (eval.json, metrics.csv and the card's table): never rename."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One key of eval.json and column of metrics.csv. `metric`: a measured quality of the SAE
    (the card's per-layer table shows those); otherwise what identifies or sizes the row. The
    description may hold `{dense_threshold}`, which whoever shows it fills in."""

    name: str
    description: str
    metric: bool = True


def _fact(name: str, description: str) -> Column:
    return Column(name, description, metric=False)


# eval.json's shared keys, in metrics.csv's column order.
EVAL_COLUMNS: tuple[Column, ...] = (
    _fact("layer", "decoder layer"),
    _fact("hookpoint", "the module whose output the SAE reads (its folder's name)"),
    _fact("tokens", "evaluated positions (BOS, EOS and PAD excluded)"),
    # Reconstruction, over every evaluated position (evaluate.ReconStats).
    Column(
        "fvu",
        "fraction of variance unexplained: squared error over the input's variance"
        " (lower is better)",
    ),
    Column("explained_variance", "1 - the error's variance over the input's variance"),
    Column("cosine", "mean cosine similarity of reconstruction and input"),
    Column("l0", "mean number of active features per token"),
    _fact("k", "latents the TopK activation keeps per token"),
    _fact("num_latents", "the SAE's width"),
    # Feature statistics of the sample split (evaluate.feature_fractions).
    Column("dead_fraction", "fraction of features that never fired on the sampled tokens"),
    Column(
        "dense_fraction",
        "fraction of features firing on more than {dense_threshold} of the sampled tokens",
    ),
    # Next-token loss at the evaluated positions (evaluate.loss_metrics).
    Column("ce_loss_clean", "next-token loss of the unmodified model"),
    Column(
        "ce_loss_spliced",
        "next-token loss with the layer's output replaced by the reconstruction",
    ),
    Column("delta_ce", "ce_loss_spliced - ce_loss_clean (lower is better)"),
    Column("ce_loss_zero_ablation", "next-token loss with the layer's output set to zero"),
    Column(
        "ce_loss_score",
        "fraction of the zero-ablation loss increase the SAE recovers (1 is perfect)",
    ),
    Column("kl", "KL divergence of the spliced from the clean next-token distribution"),
    Column(
        "kl_zero_ablation",
        "KL divergence of the zero-ablated from the clean next-token distribution",
    ),
)

# eval.json's "ladder": one entry per k of evaluate.k_ladder (the SAE's encoder keeping k
# latents per token instead of the trained k), each these keys of EVAL_COLUMNS after "k";
# metrics.csv gains them as "<name>@k<k>" columns.
LADDER_COLUMNS: tuple[Column, ...] = tuple(
    c
    for c in EVAL_COLUMNS
    if c.name
    in (
        "fvu",
        "explained_variance",
        "cosine",
        "l0",
        "ce_loss_spliced",
        "delta_ce",
        "ce_loss_score",
        "kl",
    )
)


# results/summary/spliced.json's "prefixes": one entry per prefix of model.layers (the SAEs of
# its first layers spliced in at once; the last entry, also under "suite", splices them all).
# metrics.csv gains ce_loss_spliced_prefix, delta_ce_prefix and kl_prefix: the prefix that ends
# at the row's layer.
SPLICED_COLUMNS: tuple[Column, ...] = (
    _fact("spliced_layers", "how many layers have their SAE spliced in (the first ones)"),
    _fact("last_hookpoint", "the deepest spliced hookpoint"),
    Column(
        "ce_loss_spliced",
        "next-token loss with every layer up to this one replaced by its SAE's reconstruction",
    ),
    Column("delta_ce", "ce_loss_spliced - ce_loss_clean (lower is better)"),
    Column("kl", "KL divergence of the spliced from the clean next-token distribution"),
)

# eval.json's "transfer": one entry per model of evaluate.transfer_models (e.g. the
# instruction-tuned model), "model" then these keys of EVAL_COLUMNS, measured on that model's
# activations with the SAE spliced into it (same eval tokens, same definitions).
TRANSFER_COLUMNS: tuple[Column, ...] = tuple(
    c for c in EVAL_COLUMNS if c.metric and c.name not in ("dead_fraction", "dense_fraction")
)

# The measured qualities among them, in the same order.
METRICS: tuple[Column, ...] = tuple(c for c in EVAL_COLUMNS if c.metric)

# metrics.csv's last columns: the training run's final train_metrics.jsonl line.
TRAIN_COLUMNS: tuple[Column, ...] = (
    _fact("train_tokens", "tokens the SAE was trained on"),
    Column("train_fvu", "training FVU at the last logged step"),
)

# metrics.csv's header.
CSV_COLUMNS: tuple[str, ...] = tuple(c.name for c in EVAL_COLUMNS + TRAIN_COLUMNS)
