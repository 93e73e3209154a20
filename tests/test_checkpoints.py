"""Checkpoints are identified by what makes the result (never by a path), survive failed and
changed runs, are set aside when unreadable, and a resume logs the same metrics lines as an
uninterrupted run. Every run goes through the command line where a user would see its lines."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_layer, typed
from safetensors.torch import load_file

from loupe import cli
from loupe.checkpoints import (
    OTHER,
    RUN_RECORD,
    STATE,
    UNREADABLE,
    describe_change,
    prepare_checkpoint_dir,
    swap_in,
)
from loupe.config import check_train_settings
from loupe.errors import LoupeError
from loupe.trainer import MetricsRecorder

LAYER = 1
BATCHES = 128  # 65,536 training tokens in rows of 128, 4 rows a batch (conftest's settings)


class Killed(Exception):
    """Stands for kill -9 at an exact optimizer step (the checkpoints on disk stay as they are)."""


def kill_at_step(monkeypatch, step: int) -> None:
    """Make training stop right after optimizer step `step`."""
    real = MetricsRecorder.on_step

    def on_step(self, trainer, final=False):
        real(self, trainer, final)
        if not final and (trainer.global_step + 1) // self.grad_acc_steps == step:
            raise Killed

    monkeypatch.setattr(MetricsRecorder, "on_step", on_step)


def train_cli(settings: dict, tokens: Path, out: Path, ckpt: Path, log: Path) -> int:
    """`python -m loupe --log LOG train ...` in this process; its exit code."""
    return cli.main(
        [
            "--log", str(log), "train", "--config", json.dumps(settings),
            "--layers", str(LAYER), "--tokens", str(tokens),
            "--manifest", str(tokens.with_name("manifest.json")), "--out-dir", str(out),
            "--checkpoint-dir", str(ckpt),
        ]
    )  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def summary_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "summary.json").read_text())


def copy_split(token_dir: Path, dest: Path) -> Path:
    """The training split and its manifest, copied to `dest`; the split's path."""
    dest.mkdir(parents=True)
    for name in ("train.npy", "manifest.json"):
        shutil.copy(token_dir / name, dest / name)
    return dest / "train.npy"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, settings, token_dir) -> Path:
    """Layer 1 trained to the end: `ckpt` (its checkpoint folder) and `out` (its files)."""
    root = tmp_path_factory.mktemp("finished")
    train_layer(typed(settings), LAYER, token_dir / "train.npy", root / "out", root / "ckpt")
    return root


@pytest.fixture
def ckpt(finished, tmp_path) -> Path:
    """A copy of the finished checkpoint folder, for a test to run on."""
    return Path(shutil.copytree(finished / "ckpt", tmp_path / "ckpt"))


def test_run_record_names_what_makes_the_result_and_no_path(finished, settings, token_dir):
    record = json.loads((finished / "ckpt" / STATE / RUN_RECORD).read_text())
    manifest = json.loads((token_dir / "manifest.json").read_text())
    assert record == {
        "layers": [LAYER],
        "settings": typed(settings).settings_for("train"),
        "train_tokens_sha256": manifest["sha256"]["train"],
    }
    assert str(token_dir) not in json.dumps(record) and str(finished) not in json.dumps(record)


def test_a_split_that_differs_from_its_manifest_fails_before_touching_anything(
    finished, ckpt, tmp_path, settings, token_dir, capsys
):
    """The manifest's sha256 is the checkpoint's identity: the split must be the one it
    describes (one token changed: same shape, other content)."""
    tokens = copy_split(token_dir, tmp_path / "tokens")
    split = np.load(tokens)
    split[7, 5] += 1
    np.save(tokens, split)
    before = digests(ckpt)
    log = tmp_path / "train.log"
    assert train_cli(settings, tokens, tmp_path / "out", ckpt, log) == 2
    assert capsys.readouterr().err == (
        f"loupe train: error: token split {tokens} does not match its manifest's sha256:"
        f" delete {tokens.parent / 'manifest.json'} and run again (tokenize checks its stored"
        " copy and tokenizes again if that is damaged too)\n"
    )
    assert digests(ckpt) == before and not (tmp_path / "out").exists()


def test_other_tokens_of_the_same_size_train_anew_and_reverting_resumes(
    finished, ckpt, tmp_path, settings, token_dir, monkeypatch, caplog
):
    """Issue 15 #1: a checkpoint trained on other tokens is never resumed; it is kept until
    the new run's first checkpoint, so changing back costs nothing."""
    tokens_a = token_dir / "train.npy"
    split_b = np.load(tokens_a)[::-1].copy()  # same shape and size, other content
    tokens_b = copy_split(token_dir, tmp_path / "tokens_b")
    np.save(tokens_b, split_b)
    manifest = json.loads((token_dir / "manifest.json").read_text())
    sha_a = manifest["sha256"]["train"]
    sha_b = manifest["sha256"]["train"] = hashlib.sha256(split_b.tobytes()).hexdigest()
    (tokens_b.parent / "manifest.json").write_text(json.dumps(manifest))
    finished_files = digests(finished / "ckpt" / STATE)

    # New tokens: the checkpoint is set aside, training starts at batch 0; killed at step 2,
    # before its first checkpoint (save_every 16).
    kill_at_step(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="loupe"), pytest.raises(Killed):
        train_layer(typed(settings), LAYER, tokens_b, tmp_path / "out_b", ckpt)
    monkeypatch.undo()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"setting checkpoint {ckpt / STATE} aside as {ckpt / OTHER} (settings changed:"
        f" train_tokens_sha256 {sha_a[:12]} -> {sha_b[:12]}); it is resumed if they change"
        " back before this run writes its first checkpoint"
    ]
    assert not any("resumed layer" in r.getMessage() for r in caplog.records)
    assert not (ckpt / STATE).exists() and digests(ckpt / OTHER) == finished_files

    # Back to the old tokens: the set-aside checkpoint is resumed, nothing retrained.
    log = tmp_path / "revert.log"
    assert train_cli(settings, tokens_a, tmp_path / "out_a", ckpt, log) == 0
    text = log.read_text()
    assert f"resuming checkpoint {ckpt / OTHER}, set aside when the settings changed" in text
    assert f"resumed layer {LAYER} at batch {BATCHES} from" in text
    assert summary_of(ckpt)["resumed_from_batch"] == BATCHES
    assert not (ckpt / OTHER).exists()
    for name in ("sae.safetensors", "cfg.json", "train_metrics.jsonl"):
        assert (tmp_path / "out_a" / name).read_bytes() == (finished / "out" / name).read_bytes()

    # The new tokens again, to the end: trained from batch 0, on the new tokens.
    assert train_cli(settings, tokens_b, tmp_path / "out_b", ckpt, tmp_path / "b.log") == 0
    summary = summary_of(ckpt)
    assert summary["resumed_from_batch"] == 0 and summary["batches"] == BATCHES
    assert not (ckpt / OTHER).exists()  # gone once the new run wrote a checkpoint
    a = load_file(finished / "out" / "sae.safetensors")
    b = load_file(tmp_path / "out_b" / "sae.safetensors")
    assert (a["W_dec"] - b["W_dec"]).abs().max() > 0.05  # the old SAE was not republished


def test_moving_the_project_keeps_its_checkpoints(finished, tmp_path, settings, token_dir):
    """Issue 15 #3: the record holds no path, so a moved project resumes where it was."""
    moved = tmp_path / "moved" / "results"
    tokens = copy_split(token_dir, moved / "tokens")
    ckpt = shutil.copytree(finished / "ckpt", moved / "checkpoints" / f"layer_{LAYER}")
    log = tmp_path / "train.log"
    assert train_cli(settings, tokens, moved / f"layer_{LAYER}", ckpt, log) == 0
    text = log.read_text()
    assert f"resumed layer {LAYER} at batch {BATCHES} from {ckpt / STATE}" in text
    assert f"layer {LAYER}: its checkpoint had finished training (65,536 tokens)" in text
    assert "aside" not in text and " WARNING " not in text
    published = moved / f"layer_{LAYER}" / "sae.safetensors"
    assert published.read_bytes() == (finished / "out" / "sae.safetensors").read_bytes()


UNTRAINABLE = [
    (
        {"sae": {"k": 100000}},
        "sae.k 100000 exceeds the SAE's 512 latents (64 inputs x sae.expansion_factor 8)",
    ),
    (
        {"sae": {"k": 200}},  # the demo trains with multi_topk: 4k latents must exist
        "sae.multi_topk needs 4 x sae.k = 800 latents, but the SAE has 512 (64 inputs x"
        " sae.expansion_factor 8): lower sae.k or turn multi_topk off",
    ),
    (
        {"sae": {"activation": "groupmax", "k": 7}},
        "sae.activation groupmax needs sae.k 7 to divide the SAE's 512 latents (64 inputs x"
        " sae.expansion_factor 8)",
    ),
    (
        {"train": {"batch_size": 1000}},
        "train.batch_size 1000 exceeds the 512 rows of the training split",
    ),
    (
        {"train": {"grad_acc_steps": 200}},
        "train.grad_acc_steps 200 exceeds the 128 batches of the training split"
        " (train.batch_size 4): no optimizer step would run",
    ),
    (
        {"train": {"exclude_tokens": [2, 999999]}},
        "train.exclude_tokens [999999] outside the vocabulary (2048 ids)",
    ),
]


@pytest.mark.parametrize(("change", "message"), UNTRAINABLE, ids=lambda x: str(x)[:40])
def test_untrainable_value_fails_in_one_line_before_touching_anything(
    change, message, finished, ckpt, tmp_path, settings, token_dir, capsys
):
    """Issue 15 #2: one line, exit 2, and the finished checkpoint and outputs untouched, so
    reverting the value resumes the finished checkpoint instead of training again."""
    out = Path(shutil.copytree(finished / "out", tmp_path / "out"))
    before = digests(tmp_path)
    bad = copy.deepcopy(settings)
    for section, values in change.items():
        bad[section].update(values)
    log = tmp_path / "bad.log"
    assert train_cli(bad, token_dir / "train.npy", out, ckpt, log) == 2
    assert capsys.readouterr().err == f"loupe train: error: {message}\n"
    assert "Traceback" not in log.read_text()
    log.unlink()
    assert digests(tmp_path) == before

    assert train_cli(settings, token_dir / "train.npy", out, ckpt, tmp_path / "ok.log") == 0
    assert summary_of(ckpt)["resumed_from_batch"] == BATCHES
    assert digests(out) == digests(finished / "out")


def test_untrainable_values_known_from_the_config_alone_are_caught_at_workflow_start(settings):
    """What check_train_settings can tell without the model (the workflow calls it at start)."""
    check_train_settings(typed(settings))  # the demo's settings are trainable
    s = copy.deepcopy(settings)
    s["sae"].update(num_latents=256, k=300)
    with pytest.raises(LoupeError, match=r"^sae.k 300 exceeds the SAE's 256 latents"):
        check_train_settings(typed(s))
    s = copy.deepcopy(settings)
    s["train"]["batch_size"] = 513
    with pytest.raises(LoupeError, match=r"^train.batch_size 513 exceeds the 512 rows"):
        check_train_settings(typed(s))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = [
    (
        "state.pt",
        _truncate,
        "state.pt: RuntimeError: PytorchStreamReader failed reading zip archive: failed finding"
        " central directory)",
    ),
    (
        "optimizer_0.pt",  # a pickle header, then garbage: torch's error advises weights_only
        lambda p: p.write_bytes(b"\x80\x04garbage" * 64),
        "optimizer_0.pt: UnpicklingError: not a file torch.save wrote)",
    ),
    (
        f"language_model.layers.{LAYER}/sae.safetensors",
        Path.unlink,
        f"language_model.layers.{LAYER}/sae.safetensors: missing",
    ),
    (
        f"language_model.layers.{LAYER}/recorder_state.json",
        lambda p: p.write_text('{"trained_tok'),
        f"language_model.layers.{LAYER}/recorder_state.json: JSONDecodeError: Unterminated"
        " string starting at: line 1 column 2 (char 1))",
    ),
]


@pytest.mark.parametrize(("name", "damage", "reason"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_unreadable_checkpoint_is_set_aside_and_training_starts_over(
    name, damage, reason, finished, ckpt, tmp_path, settings, token_dir
):
    """Issue 15 #5: one warning line (no traceback, no weights_only advice), the damaged
    checkpoint kept in .unreadable/, and a fresh run that trains the same SAE again."""
    damage(ckpt / STATE / name)
    damaged = digests(ckpt / STATE)
    log = tmp_path / "train.log"
    assert train_cli(settings, token_dir / "train.npy", tmp_path / "out", ckpt, log) == 0
    text = log.read_text()
    warnings = [line for line in text.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    prefix = f"checkpoint {ckpt / STATE} is unreadable ({reason}"
    assert prefix in warnings[0]
    assert warnings[0].endswith(
        f"): moved it to {ckpt / UNREADABLE}, training layer {LAYER} from the start"
    )
    assert "Traceback" not in text and "weights_only" not in text
    assert digests(ckpt / UNREADABLE) == damaged
    summary = summary_of(ckpt)
    assert summary["resumed_from_batch"] == 0 and summary["batches"] == BATCHES
    # Training is deterministic on the CPU: the same SAE as the undamaged run's.
    new = load_file(tmp_path / "out" / "sae.safetensors")
    for key, value in load_file(finished / "out" / "sae.safetensors").items():
        torch.testing.assert_close(new[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_metrics_line_after_a_resume_averages_every_batch_since_the_last_line(
    tmp_path, settings, token_dir, monkeypatch
):
    """Issue 15 #9: checkpoints after steps 3, 7, 11, ... and lines every 8 steps; killed
    after step 13, resumed from step 11: the line at step 16 must average steps 9 to 16 (the
    sums of 9 to 11 come from the checkpoint), as an uninterrupted run's does."""
    s = copy.deepcopy(settings)
    s["train"].update(save_every=4, log_every=8)
    tokens = token_dir / "train.npy"
    train_layer(typed(s), LAYER, tokens, tmp_path / "ref", tmp_path / "ref_ckpt")

    ckpt = tmp_path / "ckpt"
    kill_at_step(monkeypatch, 13)
    with pytest.raises(Killed):
        train_layer(typed(s), LAYER, tokens, tmp_path / "out", ckpt)
    monkeypatch.undo()
    log = tmp_path / "train.log"
    assert train_cli(s, tokens, tmp_path / "out", ckpt, log) == 0
    assert f"resumed layer {LAYER} at batch 11 from" in log.read_text()

    def lines(folder):
        text = (folder / "train_metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    resumed, reference = lines(tmp_path / "out"), lines(tmp_path / "ref")
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(8, 129, 8))
    for got, want in zip(resumed, reference, strict=True):
        for key in ("step", "tokens", "trained_tokens", "lr"):
            assert got[key] == want[key], (got["step"], key)
        for key in ("fvu", "multi_topk_fvu", "auxk_loss", "dead_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_no_kill_between_renames_loses_a_checkpoint(tmp_path):
    """swap_in and the trade with .other are renames: after a kill between any two of them,
    the next start finds each checkpoint whole, under the name it belongs to."""
    ckpt = tmp_path / "ckpt"
    mine, theirs = {"layers": [1], "settings": {"sae": {"k": 8}}}, {"layers": [1], "settings": {}}

    def checkpoint(folder: Path, record: dict, step: int) -> Path:
        folder.mkdir()
        (folder / "state.pt").write_text(str(step))
        (folder / RUN_RECORD).write_text(json.dumps(record))
        return folder

    def step_of(folder: Path) -> str:
        return (folder / "state.pt").read_text()

    assert not prepare_checkpoint_dir(ckpt, mine)
    for step in (1, 2):
        swap_in(checkpoint(ckpt / ".state.tmp", mine, step), ckpt / STATE)
    assert step_of(ckpt / STATE) == "2" and not list(ckpt.glob(".state.*"))
    # Killed inside swap_in, after moving the old checkpoint aside:
    (ckpt / STATE).rename(ckpt / ".state.old")
    checkpoint(ckpt / ".state.tmp", mine, 3)
    assert prepare_checkpoint_dir(ckpt, mine)
    assert step_of(ckpt / STATE) == "2" and sorted(p.name for p in ckpt.iterdir()) == [STATE]

    # Other settings: the checkpoint is set aside, not deleted.
    assert not prepare_checkpoint_dir(ckpt, theirs)
    assert step_of(ckpt / OTHER) == "2" and not (ckpt / STATE).exists()
    assert describe_change(mine, theirs) == "settings changed: sae.k 8 -> null"
    checkpoint(ckpt / STATE, theirs, 7)  # their run's first checkpoint, its save killed
    # Changing back trades places; killed after its first rename, then after its second:
    for renames in (1, 2):
        (ckpt / STATE).rename(ckpt / ".swap")
        if renames == 2:
            (ckpt / OTHER).rename(ckpt / STATE)
        assert prepare_checkpoint_dir(ckpt, mine)
        assert step_of(ckpt / STATE) == "2" and step_of(ckpt / OTHER) == "7"
        assert prepare_checkpoint_dir(ckpt, theirs)  # and back
        assert step_of(ckpt / STATE) == "7" and step_of(ckpt / OTHER) == "2"
