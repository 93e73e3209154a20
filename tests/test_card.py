"""The model card's column tables, rendered from small files written here (no staged repo):
each per-feature file's columns are described by the file's own schema (its writer's), never
restated by hand in the card's prose."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from helpers import REPO, load_yaml, typed

from loupe.card import COLUMN_TABLES, CardFacts, render_card, staged_columns, writer_columns
from loupe.examples import column_descriptions, examples_schema, interval_examples_schema
from loupe.explain import explanations_schema
from loupe.layout import Layout
from loupe.logits import feature_logits_schema
from loupe.neighbours import neighbours_schema

WRITERS = {
    "examples": examples_schema,
    "intervals": interval_examples_schema,
    "logits": feature_logits_schema,
    "neighbours": neighbours_schema,
    "explanations": explanations_schema,
}
LAYER = 0


def tables_after(card: str) -> dict[str, list[tuple[str, str, str]]]:
    """Each (column, type, meaning) table of the card, keyed by the paragraph before it."""
    blocks = card.split("\n\n")
    out = {}
    for before, block in zip(blocks, blocks[1:], strict=False):
        lines = block.strip("\n").splitlines()
        if lines and lines[0] == "| column | type | meaning |":
            rows = [line.strip("| ").split(" | ") for line in lines[2:]]
            out[before] = [(name.strip("`"), kind, meaning) for name, kind, meaning in rows]
    return out


def table_of(card: str, path: str) -> list[tuple[str, str, str]]:
    """The column table right after the paragraph that names the file `path`."""
    (table,) = [rows for before, rows in tables_after(card).items() if f"`{path}`" in before]
    return table


@pytest.fixture(scope="module")
def card(tmp_path_factory) -> tuple[str, Layout]:
    """The gemma-loupe card, its column tables read from files written with each writer's
    schema under the staged layout (empty: only the schema counts)."""
    config = typed(load_yaml(REPO / "config.yaml"))
    layout = Layout.of(config)
    root = tmp_path_factory.mktemp("card")
    for kind, schema in WRITERS.items():
        path = root / layout.per_layer(kind, LAYER)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(schema().empty_table(), path)
    columns = staged_columns(root, layout, LAYER)
    assert columns == writer_columns()  # the staged files are written with the writers' schemas
    example_columns = [(f.name, str(f.type), d) for f, d in zip(
        examples_schema(), column_descriptions(examples_schema()).values(), strict=True
    )]  # fmt: skip
    facts = CardFacts(
        layers=list(config.model.layers),
        sae={**vars(config.sae), "d_in": 1536},
        num_latents=49152,
        sae_bytes=604_000_000,
        metrics=[{"layer": str(n), "fvu": "0.2"} for n in config.model.layers],
        example_columns=example_columns,
        example_rows=0,
        stats_columns=[("feature", "int64", "feature (latent) index")],
        plots=[],
        columns=columns,
        # One layer's explanation_scores row (none scored), so the card has its Explanations.
        explanations=[
            {
                "layer": LAYER,
                "explainer": "m",
                "live": 8,
                "explained": 4,
                "ok": 4,
                "unparsed": 0,
                "failed": 0,
                "coverage": 0.5,
                "detection_scored": 0,
                "fuzzing_scored": 0,
            }
        ],  # fmt: skip
    )
    return render_card(config, facts), layout


@pytest.mark.parametrize("kind", ["logits", "neighbours", "explanations"])
def test_a_files_column_table_is_its_schemas_descriptions(card, kind):
    text, layout = card
    described = column_descriptions(WRITERS[kind]())
    table = table_of(text, layout.per_layer(kind, "N"))
    assert [(name, meaning) for name, _, meaning in table] == list(described.items())
    assert [kind for _, kind, _ in table] == [str(f.type) for f in WRITERS[kind]()]


def test_the_intervals_table_holds_what_differs_from_the_top_examples(card):
    text, layout = card
    examples = column_descriptions(examples_schema())
    intervals = column_descriptions(interval_examples_schema())
    table = table_of(text, layout.per_layer("intervals", "N"))
    expected = [(c, d) for c, d in intervals.items() if examples.get(c) != d]
    assert [(name, meaning) for name, _, meaning in table] == expected
    # The interval's own columns, and rank, counted within the interval rather than the feature.
    assert [name for name, _, _ in table] == [
        "rank",
        "interval",
        "interval_low",
        "interval_high",
        "interval_count",
    ]
    # The others are in the top examples' table, with the same descriptions.
    tables = [[(c, m) for c, _, m in rows] for rows in tables_after(text).values()]
    assert list(examples.items()) in tables


def test_every_kind_with_a_table_is_shown(card):
    text, layout = card
    assert set(COLUMN_TABLES) == set(WRITERS) - {"examples", "explanations"}
    for kind in (*COLUMN_TABLES, "explanations"):
        assert table_of(text, layout.per_layer(kind, "N")), kind
