"""The staged repo and its card show the evaluations suites are compared by: the tradeoffs
rule's tables beside metrics.csv and its plots in plots/ (in the manifest), and the card's
sections on the sparsity ladder, transfer and the whole suite spliced, with their numbers; and
the card reads sensibly when the ladder or the transfer models were left empty."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import test_stage
from helpers import typed
from test_stage import METRIC_ROWS, _inputs, _stage_args, run_cli

from loupe.layout import REPO_MANIFEST
from loupe.metrics import TRANSFER_COLUMNS
from loupe.stage import stage
from loupe.tradeoffs import summarize_tradeoffs

LAYERS = [1, 2]
KS = [4, 8, 32]
IT = "google/gemma-4-E2B-it"
# test_stage's fixtures: the staged inputs of layers 1 and 2 (as the upstream rules leave them).
pub_settings = test_stage.pub_settings
results = test_stage.results

OUTPUTS = {
    "ladder_csv": "ladder.csv",
    "ladder_plot": "sparsity_ladder.png",
    "spliced_csv": "spliced.csv",
    "spliced_plot": "spliced_by_depth.png",
    "transfer_csv": "transfer.csv",
    "transfer_plot": "transfer_by_layer.png",
}


def fake_eval(layer: int, ladder: bool, transfer: bool) -> dict:
    ev = {c.name: 0.5 for c in TRANSFER_COLUMNS}
    ev.update(layer=layer, fvu=0.1 * layer, explained_variance=1 - 0.1 * layer, delta_ce=0.02)
    if ladder:
        ev["ladder"] = [
            {"k": k, "fvu": 0.1 * layer + 1 / k, "delta_ce": 0.01 * layer + 0.1 / k, "l0": k}
            for k in KS
        ]
    if transfer:
        moved = {c.name: 0.25 for c in TRANSFER_COLUMNS}
        # explained variance negative at layer 2 only
        moved.update(model=IT, fvu=1.0 + layer, explained_variance=0.7 - 0.4 * layer)
        ev["transfer"] = [moved]
    return ev


def tradeoffs(folder, settings: dict, ladder: bool = True, transfer: bool = True) -> dict:
    """The tradeoffs rule's outputs for LAYERS, through its own function."""
    folder.mkdir()
    evals = []
    for layer in LAYERS:
        evals.append(folder / f"eval_{layer}.json")
        evals[-1].write_text(json.dumps(fake_eval(layer, ladder, transfer)))
    prefixes = [
        {
            "spliced_layers": i + 1,
            "last_hookpoint": f"language_model.layers.{n}",
            "last_layer": n,
            "ce_loss_spliced": 3.05 + 0.15 * i,
            "delta_ce": 0.05 + 0.15 * i,
            "kl": 0.01 + 0.02 * i,
        }
        for i, n in enumerate(LAYERS)
    ]
    spliced = folder / "spliced.json"
    spliced.write_text(json.dumps({"prefixes": prefixes, "suite": prefixes[-1]}))
    out = {key: folder / name for key, name in OUTPUTS.items()}
    summarize_tradeoffs(typed(settings), evals, spliced, **out)
    return out


@pytest.fixture(scope="module")
def staged_additions(tmp_path_factory, pub_settings, results):
    """The repo staged through the command line, as the `stage` rule runs it, with the
    tradeoffs rule's outputs among the summary's."""
    root = tmp_path_factory.mktemp("additions")
    made = tradeoffs(root / "summary", pub_settings)
    args = _stage_args(pub_settings, results, root / "hub")
    at = args.index("--manifest")  # after the summary's files
    args[at:at] = [str(made[key]) for key in OUTPUTS]
    assert run_cli(["--log", str(root / "stage.log"), *args]) == 0
    return root / "hub", made


def embedded(card: str) -> list[str]:
    return re.findall(r"!\[[^]]*\]\(([^)]+)\)", card)


def test_the_tables_and_plots_are_staged_and_listed(staged_additions, pub_settings):
    hub, made = staged_additions
    prefix = pub_settings["hub"]["prefix"]
    listed = {f["path"] for f in json.loads((hub / REPO_MANIFEST).read_text())["files"]}
    for key, name in OUTPUTS.items():
        path = f"{prefix}/{name}" if name.endswith(".csv") else f"{prefix}/plots/{name}"
        assert (hub / path).read_bytes() == made[key].read_bytes(), path
        assert path in listed


def test_the_card_shows_the_ladder_transfer_and_splice(staged_additions, pub_settings):
    hub, _ = staged_additions
    prefix = pub_settings["hub"]["prefix"]
    card = (hub / "README.md").read_text()
    # The repo's file table names the three tables.
    for name in ("ladder.csv", "transfer.csv", "spliced.csv"):
        assert f"| `{prefix}/{name}` |" in card
    # Ladder: FVU and delta-CE at every k, columns named as in metrics.csv.
    assert "keeping k = 4, 8, 32 latents per token instead of its trained k = 8" in card
    header = "| layer | fvu@k4 | fvu@k8 | fvu@k32 | delta_ce@k4 | delta_ce@k8 | delta_ce@k32 |"
    assert header in card
    for layer in LAYERS:  # eval.json's numbers, to 4 significant digits
        rungs = fake_eval(layer, ladder=True, transfer=False)["ladder"]
        cells = [f"{r[key]:.4g}" for key in ("fvu", "delta_ce") for r in rungs]
        assert f"| {layer} | {' | '.join(cells)} |" in card
    # Transfer: the base model's numbers beside the other model's, means, negative layers.
    base = pub_settings["model"]["name"]
    assert f"| layer | fvu | fvu@{IT} | explained_variance | explained_variance@{IT} |" in card
    assert "| 1 | 0.1 | 2 | 0.9 | 0.3 | 0.02 | 0.25 |" in card
    assert "| 2 | 0.2 | 3 | 0.8 | -0.1 | 0.02 | 0.25 |" in card
    assert f"- `{IT}`: mean FVU 2.5, mean explained variance 0.1, mean delta-CE 0.25;" in card
    assert (
        f"`{IT}`: mean FVU 2.5, mean explained variance 0.1, mean delta-CE 0.25; FVU above 1 (the"
        " reconstruction further from the activations than their mean) at layers 1, 2;"
        " explained variance negative (the error varies more than the activations) at layer 2."
    ) in card
    assert (
        f"`{base}`: mean FVU 0.15, mean explained variance 0.85, mean delta-CE 0.02; FVU above 1"
        " (the reconstruction further from the activations than their mean) at no layer;"
        " explained variance negative (the error varies more than the activations) at no layer."
    ) in card
    # The whole suite: clean -> all spliced, KL, the per-layer sum (metrics.csv's delta_ce).
    summed = METRIC_ROWS[0]["delta_ce"] + METRIC_ROWS[1]["delta_ce"]
    tokens = min(8192, pub_settings["evaluate"]["spliced_max_tokens"])
    eval_tokens = min(8192, pub_settings["evaluate"]["max_tokens"])
    # The per-layer numbers come from the evaluation's own tokens: said where they differ.
    alone = f", on the evaluation's {eval_tokens:,} tokens" if eval_tokens != tokens else ""
    assert (
        f"With all 2 SAEs spliced into one forward (each layer's output replaced by its SAE's"
        f" reconstruction), next-token loss on {tokens:,} eval tokens goes from 3 (the clean"
        f" model) to 3.2: delta-CE 0.2, KL 0.03 from the clean next-token distribution, where"
        f" the per-layer delta-CEs (each layer spliced alone{alone}) sum to {summed:.4g}." in card
    )
    assert "| 1 | 1 | 3.05 | 0.05 | 0.01 | 0.0421 |" in card
    assert f"| 2 | 2 | 3.2 | 0.2 | 0.03 | {summed:.4g} |" in card
    # Every plot once, in its place, at a path the repo holds.
    plots = embedded(card)
    assert all((hub / p).is_file() for p in plots)
    for name in ("sparsity_ladder.png", "transfer_by_layer.png", "spliced_by_depth.png"):
        assert [p for p in plots if p.endswith(name)] == [f"{prefix}/plots/{name}"]
    sections = ["### Sparsity ladder", "### Transfer to other models", "### All layers at once"]
    at = [card.index(s) for s in sections]
    assert at == sorted(at) and card.index("## Evaluation") < at[0] < card.index("## Limitations")
    assert card.index("sparsity_ladder.png") > at[0]


def test_the_card_reads_sensibly_without_ladder_or_transfer(tmp_path, pub_settings, results):
    settings = copy.deepcopy(pub_settings)
    made = tradeoffs(tmp_path / "summary", settings, ladder=False, transfer=False)
    inputs = _inputs(settings, results)
    inputs = dataclasses.replace(
        inputs,
        plots=[*inputs.plots, made["ladder_plot"], made["spliced_plot"], made["transfer_plot"]],
        tables=[made["ladder_csv"], made["spliced_csv"], made["transfer_csv"]],
    )
    stage(typed(settings), inputs, tmp_path / "hub")
    card = (tmp_path / "hub/README.md").read_text()
    assert "No sparsity ladder was evaluated for this suite (`evaluate.k_ladder` was empty)" in card
    assert (
        "No other model was evaluated for this suite (`evaluate.transfer_models` was empty)" in card
    )
    assert "@k" not in card and "explained_variance@" not in card  # no empty tables
    plots = embedded(card)
    assert not [p for p in plots if p.endswith(("sparsity_ladder.png", "transfer_by_layer.png"))]
    assert [p for p in plots if p.endswith("spliced_by_depth.png")]  # the splice still shows


def check_demo_additions(workdir, config: dict) -> None:
    """A built workflow's metrics.csv, staged repo and card hold its ladder, transfer and
    splice: the cells equal eval.json's and spliced.json's, the card names every k and model."""
    import csv

    results, layers = workdir / "results", config["model"]["layers"]
    ev = config["evaluate"]
    with open(results / "summary/metrics.csv", newline="") as f:
        rows = {int(r["layer"]): r for r in csv.DictReader(f)}
    spliced = json.loads((results / "summary/spliced.json").read_text())
    prefixes = {p["last_layer"]: p for p in spliced["prefixes"]}
    for layer in layers:
        e = json.loads((results / f"layer_{layer}/eval.json").read_text())
        assert sorted(r["k"] for r in e["ladder"]) == sorted(ev["k_ladder"])
        for rung in e["ladder"]:
            assert float(rows[layer][f"fvu@k{rung['k']}"]) == pytest.approx(rung["fvu"])
        for t in e["transfer"]:
            assert float(rows[layer][f"delta_ce@{t['model']}"]) == pytest.approx(t["delta_ce"])
        assert float(rows[layer]["kl_prefix"]) == pytest.approx(prefixes[layer]["kl"])
    hub, prefix = results / "hub", config["hub"]["prefix"]
    listed = {f["path"] for f in json.loads((hub / REPO_MANIFEST).read_text())["files"]}
    for name in ("ladder.csv", "transfer.csv", "spliced.csv"):
        assert f"{prefix}/{name}" in listed
    for name in ("sparsity_ladder.png", "transfer_by_layer.png", "spliced_by_depth.png"):
        assert f"{prefix}/plots/{name}" in listed
    card = (hub / "README.md").read_text()
    assert f"keeping k = {', '.join(map(str, sorted(ev['k_ladder'])))} latents" in card
    for model in ev["transfer_models"]:
        assert f"| explained_variance@{model} |" in card
    assert f"With all {len(layers)} SAEs spliced into one forward" in card


@pytest.mark.e2e
def test_demo_stages_and_cards_the_additions(demo_run):
    from helpers import demo_config

    check_demo_additions(demo_run, demo_config())
