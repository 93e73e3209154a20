"""Layer groups: several layers' SAEs trained on one shared forward pass. Each layer trained in
a group equals the same layer trained alone, a killed group resumes every member from its one
checkpoint, a checkpoint of another grouping is set aside and never mixed in, and the workflow
runs one job per group whose command does not depend on the grouping."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    announced_jobs,
    copy_workflow,
    demo_tokens,
    kill_after_first_checkpoint,
    planned,
    run_snakemake,
    split_with_manifest,
    train_layer,
    typed,
)
from safetensors.torch import load_file

from loupe.checkpoints import OTHER, RUN_RECORD, STATE
from loupe.config import layer_groups
from loupe.errors import LoupeError
from loupe.train import train_group
from loupe.trainer import MetricsRecorder

GROUP = [4, 1]  # deliberately out of depth order: each layer keeps its own output folder
ROWS = 96  # 24 batches of 4 rows: a checkpoint after step 15 and one at the end (save_every 16)


def lines(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "train_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def split(tmp_path_factory, token_dir) -> Path:
    return split_with_manifest(token_dir, tmp_path_factory.mktemp("split"), ROWS)


@pytest.fixture(scope="module")
def alone(tmp_path_factory, settings, split) -> Path:
    """Each layer of GROUP trained alone: root/layer_N (its files), root/ckpt_N."""
    root = tmp_path_factory.mktemp("alone")
    for layer in GROUP:
        train_layer(typed(settings), layer, split, root / f"layer_{layer}", root / f"ckpt_{layer}")
    return root


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, settings, split) -> tuple[Path, dict]:
    """GROUP trained as one group: root/layer_N (each member's files), root/ckpt; the summary."""
    root = tmp_path_factory.mktemp("grouped")
    outs = [root / f"layer_{layer}" for layer in GROUP]
    summary = train_group(
        typed(settings), GROUP, split, split.with_name("manifest.json"), outs, root / "ckpt"
    )
    return root, summary


# --- the grouping itself ----------------------------------------------------------------------


def _config(settings, layers, **train):
    s = copy.deepcopy(settings)
    s["model"]["layers"] = layers
    s["train"].update(train)
    return typed(s)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 35, 40])
def test_layers_per_job_groups_every_layer_once_filling_from_the_deepest(settings, n):
    layers = [0, 3, *range(5, 38)]  # 35 layers, not all consecutive indices, listed unsorted
    groups = layer_groups(_config(settings, layers[::-1], layers_per_job=n))
    assert [layer for g in groups for layer in g] == sorted(layers)  # every layer once, in order
    sizes = [len(g) for g in groups]
    assert len(groups) == -(-35 // n)  # as few jobs as the size allows
    assert sizes[1:] == [min(n, 35)] * (len(groups) - 1)  # full groups, the deepest last
    assert 1 <= sizes[0] <= n  # the one smaller group is the shallowest


def test_explicit_groups_and_their_one_line_errors(settings):
    layers = [0, 1, 2, 3, 4, 5]
    assert layer_groups(_config(settings, layers, layer_groups=[[5, 0], [3, 1, 2], [4]])) == [
        [0, 5],
        [1, 2, 3],
        [4],
    ]
    # Explicit groups override layers_per_job (which a layered config may set too).
    explicit = _config(settings, layers, layer_groups=[[0, 1], [2, 3, 4, 5]], layers_per_job=5)
    assert layer_groups(explicit) == [[0, 1], [2, 3, 4, 5]]
    bad = [
        ([[0, 1], [2, 3]], {}, "model.layers [4, 5] are in no group"),
        ([[0, 1, 2], [2, 3, 4, 5]], {}, "layer 2 is in two groups, [0, 1, 2] and [2, 3, 4, 5]"),
        ([[0, 1, 2, 3, 4, 5, 9]], {}, "layer 9 is not in model.layers [0, 1, 2, 3, 4, 5]"),
    ]
    for groups, more, message in bad:
        with pytest.raises(LoupeError, match=re.escape(message)) as e:
            layer_groups(_config(settings, layers, layer_groups=groups, **more))
        assert "\n" not in str(e.value)


# --- equality with training alone -------------------------------------------------------------


def test_each_layer_trained_in_a_group_equals_it_trained_alone(alone, grouped):
    """Same seed, same batches: sparsify seeds each SAE right before building it, steps each
    SAE in its own layer's hook (the model's activations are untouched), and keeps every
    optimizer state per parameter; the cut after the deepest member leaves the shallower
    layers' activations bit for bit (test_train). So nothing is shared but the forward."""
    root, _ = grouped
    for layer in GROUP:
        a = load_file(root / f"layer_{layer}" / "sae.safetensors")
        b = load_file(alone / f"layer_{layer}" / "sae.safetensors")
        assert a.keys() == b.keys()
        for name in a:
            # The tightest equality: bit for bit (the issue asks for 1e-5).
            assert torch.equal(a[name], b[name]), (layer, name, (a[name] - b[name]).abs().max())
        got, want = lines(root / f"layer_{layer}"), lines(alone / f"layer_{layer}")
        assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(4, 25, 4))
        for g, w in zip(got, want, strict=True):
            g.pop("tokens_per_s"), w.pop("tokens_per_s")  # wall time
            assert g == w, layer
        cfg = (root / f"layer_{layer}" / "cfg.json").read_text()
        assert cfg == (alone / f"layer_{layer}" / "cfg.json").read_text()


def test_group_summary_and_bos_never_reaches_an_sae(grouped, settings, split):
    root, summary = grouped
    ctx, batch = settings["tokens"]["ctx_len"], settings["train"]["batch_size"]
    batches = ROWS // batch
    assert summary["layers"] == sorted(GROUP)
    assert (summary["batches"], summary["tokens"]) == (batches, batches * batch * ctx)
    assert [s["layer"] for s in summary["saes"]] == sorted(GROUP)
    for sae in summary["saes"]:
        assert sae["hookpoint"] == f"language_model.layers.{sae['layer']}"
        # One BOS per row, excluded (exclude_tokens [2]): ctx - 1 tokens per row reach each SAE.
        assert sae["trained_tokens"] == batches * batch * (ctx - 1)
        assert lines(root / f"layer_{sae['layer']}")[-1]["trained_tokens"] == sae["trained_tokens"]
    record = json.loads((root / "ckpt" / STATE / RUN_RECORD).read_text())
    manifest = json.loads(split.with_name("manifest.json").read_text())
    assert record == {
        "layers": sorted(GROUP),
        "settings": typed(settings).settings_for("train"),
        "train_tokens_sha256": manifest["sha256"]["train"],
    }


# --- resume -----------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for kill -9 right after an optimizer step (the checkpoints on disk stay)."""


def test_another_groupings_checkpoint_is_set_aside_not_mixed(
    tmp_path, settings, split, alone, monkeypatch, caplog
):
    """Killed after step 17 (sparsify checkpoints after step 15 with save_every 16), then
    layer 1 alone in the same folder: the group's checkpoint holds layer 1's SAE at step 15,
    but it is set aside and layer 1 trains from batch 0, to the same SAE as alone."""
    ckpt, manifest = tmp_path / "ckpt", split.with_name("manifest.json")
    real = MetricsRecorder.on_step

    def on_step(self, trainer, final=False):
        real(self, trainer, final)
        if not final and trainer.global_step + 1 == 17:
            raise Killed

    monkeypatch.setattr(MetricsRecorder, "on_step", on_step)
    with pytest.raises(Killed):
        train_group(typed(settings), GROUP, split, manifest, [tmp_path / "a", tmp_path / "b"], ckpt)
    monkeypatch.undo()
    assert json.loads((ckpt / STATE / RUN_RECORD).read_text())["layers"] == sorted(GROUP)
    assert torch.load(ckpt / STATE / "state.pt")["global_step"] == 15

    with caplog.at_level("INFO", logger="loupe"):
        summary = train_layer(typed(settings), 1, split, tmp_path / "layer_1", ckpt)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"setting checkpoint {ckpt / STATE} aside as {ckpt / OTHER} (settings changed: layers"
        " [1, 4] -> [1]); it is resumed if they change back before this run writes its first"
        " checkpoint"
    ]
    assert "resumed layer" not in caplog.text
    assert summary["resumed_from_batch"] == 0
    assert not (ckpt / OTHER).exists()  # gone once the new run wrote its own checkpoint
    a = load_file(tmp_path / "layer_1" / "sae.safetensors")
    b = load_file(alone / "layer_1" / "sae.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _train_cmd(settings, layers, tokens, outs, ckpt, log):
    return [
        sys.executable, "-m", "loupe", "--log", str(log), "train",
        "--config", json.dumps(settings), "--layers", *map(str, layers),
        "--tokens", str(tokens), "--manifest", str(tokens.with_name("manifest.json")),
        "--out-dir", *map(str, outs), "--checkpoint-dir", str(ckpt),
    ]  # fmt: skip


@pytest.mark.slow  # over 30 s: outside the fast loop
def test_group_killed_with_sigkill_resumes_every_member_from_one_checkpoint(
    tmp_path, settings, token_dir
):
    """kill -9 at a random moment after the first checkpoint (maybe mid-save), then the same
    command: every member resumes at the same batch and ends bit for bit as an uninterrupted
    group run (the checkpoint holds ScheduleFree's eval weights, recomputed as in the run)."""
    s = copy.deepcopy(settings)
    s["train"].update(batch_size=1, grad_acc_steps=2, save_every=8, log_every=8)
    tokens, layers = token_dir / "train.npy", [3, 1]
    outs, ckpt, log = [tmp_path / "out3", tmp_path / "out1"], tmp_path / "ckpt", tmp_path / "log"
    kill_after_first_checkpoint(
        _train_cmd(s, layers, tokens, outs, ckpt, log), ckpt / STATE / "state.pt"
    )
    assert not any((out / "sae.safetensors").exists() for out in outs)

    subprocess.run(_train_cmd(s, layers, tokens, outs, ckpt, log), check=True)
    resumed_at = int(log.read_text().split("resumed layers 1, 3 at batch ")[1].split()[0])
    assert 0 < resumed_at < 512 and resumed_at % 2 == 0  # a step boundary, not batch 0
    assert json.loads((ckpt / "summary.json").read_text())["resumed_from_batch"] == resumed_at

    refs = [tmp_path / "ref3", tmp_path / "ref1"]
    train_group(typed(s), layers, tokens, tokens.with_name("manifest.json"), refs, tmp_path / "r")
    for out, ref in zip(outs, refs, strict=True):
        got, want = lines(out), lines(ref)
        assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(8, 257, 8))
        assert got[-1]["trained_tokens"] == want[-1]["trained_tokens"] == 512 * 127
        a, b = load_file(out / "sae.safetensors"), load_file(ref / "sae.safetensors")
        for name in a:
            assert torch.equal(a[name], b[name]), (out.name, name, (a[name] - b[name]).abs().max())


# --- the workflow -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("groups-checkout"))


def planned_training(
    workdir: Path, targets: list[str], train: dict, tmp_path: Path, demo: bool = True
):
    """Training jobs a dry run plans for `targets` with `train` over the demo config (or
    config.yaml, the flagship's): [(rule, shell command, resources)]."""
    extra = tmp_path / "train.yaml"
    extra.write_text(yaml.safe_dump({"train": train}))
    config = "profiles/demo/demo-config.yaml" if demo else "config.yaml"
    proc = run_snakemake(
        workdir, *targets, *(["--profile", "profiles/demo"] if demo else ["--cores", "8"]),
        "-n", "-p", "--forceall", "--configfile", config, str(extra),
    )  # fmt: skip
    training = [
        job for job in announced_jobs(proc.stdout + proc.stderr) if job.rule.startswith("train")
    ]
    assert all(job.shell and job.resources for job in training), training
    return [(job.rule, job.shell, job.resources) for job in training]


def test_a_layers_target_trains_its_group_with_one_command_template(checkout, tmp_path):
    ((rule, cmd, res),) = planned_training(
        checkout, ["results/layer_4/sae.safetensors"], {"layers_per_job": 4}, tmp_path
    )
    # Groups fill from the deepest layer: [0, 1] and [2, 3, 4, 5]; layer 4's trains all four.
    assert rule == "train_layers_2_to_5"
    logs = " ".join(f"results/layer_{n}/train.log" for n in (2, 3, 4, 5))
    tokens = demo_tokens()
    assert cmd == (
        f"python -m loupe $(printf -- '--log %s ' {logs}) train --threads 2 --layers 2 3 4 5"
        f" --tokens {tokens}/train.npy --manifest {tokens}/manifest.json"
        " --out-dir results/layer_2 results/layer_3 results/layer_4 results/layer_5"
        " --checkpoint-dir results/checkpoints/layer_2"
    )
    assert (res["gpu"], res["mem_mb"], res["runtime"]) == ("1", str(47000 + 1000 * 4), "60")

    ((rule, cmd, res),) = planned_training(
        checkout, ["results/layer_4/sae.safetensors"], {"layers_per_job": 1}, tmp_path
    )
    assert rule == "train" and res["mem_mb"] == str(47000 + 1000)
    assert cmd == (
        "python -m loupe $(printf -- '--log %s ' results/layer_4/train.log) train --threads 2"
        f" --layers 4 --tokens {tokens}/train.npy --manifest {tokens}/manifest.json"
        " --out-dir results/layer_4 --checkpoint-dir results/checkpoints/layer_4"
    )


def test_flagship_job_sizes_grow_with_depth_and_members(checkout, tmp_path):
    """Gemma 4 E2B, 1B tokens: per-layer jobs ask for more time the deeper the layer; a job's
    host memory grows by 1 GB per SAE; no job asks for more than 24 h (longer ones resume)."""
    targets = [f"results/layer_{n}/sae.safetensors" for n in (0, 20, 34)]
    alone = planned_training(checkout, targets, {"layers_per_job": 1}, tmp_path, demo=False)
    runtimes = [int(res["runtime"]) for _, _, res in sorted(alone, key=lambda j: j[1])]
    assert [rule for rule, _, _ in alone] == ["train"] * 3
    assert 60 < runtimes[0] < runtimes[1] < runtimes[2] <= 1440, runtimes
    assert {res["mem_mb"] for _, _, res in alone} == {"48000"}
    grouped = planned_training(checkout, targets, {"layers_per_job": 12}, tmp_path, demo=False)
    assert {rule: (res["mem_mb"], res["runtime"]) for rule, _, res in grouped} == {
        "train_layers_0_to_10": ("58000", "1440"),
        "train_layers_11_to_22": ("59000", "1440"),
        "train_layers_23_to_34": ("59000", "1440"),
    }


def test_explicit_groups_plan_one_job_each_and_a_group_of_one_is_rule_train(checkout, tmp_path):
    jobs = planned_training(checkout, ["all"], {"layer_groups": [[5, 0], [1, 2, 3], [4]]}, tmp_path)
    assert sorted(
        (rule, re.search(r"--layers ([\d ]+) ", cmd).group(1)) for rule, cmd, _ in jobs
    ) == [
        ("train", "4"),
        ("train_layers_0_5", "0 5"),
        ("train_layers_1_to_3", "1 2 3"),
    ]


def test_bad_grouping_or_layer_fails_the_plan_in_one_line(checkout, tmp_path):
    extra = tmp_path / "bad.yaml"
    extra.write_text(yaml.safe_dump({"train": {"layer_groups": [[0, 1, 2], [3, 4]]}}))
    proc = run_snakemake(
        checkout, "-n", "--configfile", "profiles/demo/demo-config.yaml", str(extra), check=False
    )
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).splitlines()
    assert (
        "config error at train/layer_groups: model.layers [5] are in no group (every layer must"
        " be in one)"
    ) in lines
    proc = run_snakemake(
        checkout, "--profile", "profiles/demo", "-n", "results/layer_9/sae.safetensors", check=False
    )
    assert proc.returncode != 0
    assert "layer 9 is not configured (model.layers: 0..5, 6 layers)" in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_regrouping_a_finished_run_retrains_only_groups_with_a_missing_member(demo_run, tmp_path):
    """After a full demo run (one job per layer), regrouping plans nothing; with layer 4's
    SAE deleted it plans one training job, layer 4's group [3, 4, 5], which rewrites its three
    members, and the steps that read them."""
    run = Path(shutil.copytree(demo_run, tmp_path / "run", symlinks=True))
    for train in ({"layers_per_job": 3}, {"layer_groups": [[0, 5], [1, 2, 3, 4]]}):
        assert planned(run, {"train": train}, tmp_path) == {}, train
    (run / "results/layer_4/sae.safetensors").unlink()
    assert planned(run, {"train": {"layers_per_job": 3}}, tmp_path) == {
        "train_layers_3_to_5": 1,
        "maxact": 3,
        "evaluate": 3,
        "neighbours": 4,  # layers 3-5, and layer 2, whose next layer is 3
        "explain": 3,
        "spliced": 1,
        "flow": 1,
        "summary": 1,
        "tradeoffs": 1,
        "explanation_scores": 1,
        "stage": 1,
    }
