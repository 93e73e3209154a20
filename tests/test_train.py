"""Training: the saved SAE is sparsify's, reduces error on held-out tokens, never sees BOS,
resumes after kill -9, and works on another architecture; truncation changes nothing."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import kill_after_first_checkpoint, split_with_manifest, train_layer, typed

from loupe.errors import LoupeError
from loupe.gpus import select_device
from loupe.model import capture, import_sparsify, load_model, truncate_after
from loupe.train import train_config

sparsify = import_sparsify()


def _eval_activations(settings, token_dir, layer: int, rows: int = 32) -> torch.Tensor:
    """Layer activations on held-out eval rows, BOS positions dropped: [tokens, d]."""
    model = load_model(settings["model"]["name"], torch.device("cpu"), None, "auto")
    ids = torch.from_numpy(np.load(token_dir / "eval.npy")[:rows].astype(np.int64))
    acts = capture(model, settings["model"]["hookpoint"].format(layer=layer), ids)
    return acts[:, 1:].reshape(-1, acts.shape[-1]).float()


def _fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        enc = sae.encode(x)
        recon = sae.decode(enc.top_acts, enc.top_indices)
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_trained_sae_reduces_error_on_eval_split(trained_layer, settings, token_dir):
    sae = sparsify.SparseCoder.load_from_disk(trained_layer, device="cpu")
    x = _eval_activations(settings, token_dir, layer=2)
    untrained = sparsify.SparseCoder(x.shape[1], sae.cfg, device="cpu")
    untrained.b_dec.data = x.mean(0)  # a fair baseline: the same centring the trainer does
    trained_fvu, untrained_fvu = _fvu(sae, x), _fvu(untrained, x)
    print(f"eval fvu: trained {trained_fvu:.3f}, untrained {untrained_fvu:.3f}")
    # A random 8x dictionary with k of 64 dims already explains half the variance of these
    # near-Gaussian activations; training must still cut the remaining error clearly.
    assert trained_fvu < 0.85 * untrained_fvu, (trained_fvu, untrained_fvu)
    assert trained_fvu < 0.5


def test_cfg_json_matches_config(trained_layer, settings):
    cfg = json.loads((trained_layer / "cfg.json").read_text())
    for key in ("k", "expansion_factor", "multi_topk", "activation", "normalize_decoder"):
        assert cfg[key] == settings["sae"][key], key
    assert cfg["d_in"] == 64  # the tiny model's hidden size
    sae = sparsify.SparseCoder.load_from_disk(trained_layer, device="cpu")
    assert sae.num_latents == 64 * settings["sae"]["expansion_factor"]


def test_train_config_passes_every_sparsify_field_from_the_config(tmp_path, settings):
    from dataclasses import fields

    cfg = train_config(typed(settings), 4, tmp_path / "ckpt")
    assert isinstance(cfg, sparsify.TrainConfig)
    assert cfg.hookpoints == ["language_model.layers.4"]
    group = train_config(typed(settings), [1, 4], tmp_path / "ckpt")
    assert group.hookpoints == ["language_model.layers.1", "language_model.layers.4"]
    assert cfg.save_dir == str(tmp_path / "ckpt")
    assert {key: getattr(cfg.sae, key) for key in settings["sae"]} == settings["sae"]
    # Every key of `train:` that sparsify's TrainConfig has is passed on unchanged.
    sparsify_fields = {f.name for f in fields(sparsify.TrainConfig)}
    passed = {key for key in settings["train"] if key in sparsify_fields}
    for key in passed:
        assert getattr(cfg, key) == settings["train"][key], key
    assert passed >= {
        "batch_size",
        "grad_acc_steps",
        "micro_acc_steps",
        "optimizer",
        "lr",
        "auxk_alpha",
        "dead_feature_threshold",
        "exclude_tokens",
        "init_seeds",
        "save_every",
    }


def test_metrics_record_every_logged_step_and_bos_never_reaches_the_sae(trained_layer, settings):
    rows = [
        json.loads(line)
        for line in (trained_layer / "train_metrics.jsonl").read_text().splitlines()
    ]
    train, ctx = settings["train"], settings["tokens"]["ctx_len"]
    steps = settings["tokens"]["train_tokens"] // (
        ctx * train["batch_size"] * train["grad_acc_steps"]
    )
    assert [r["step"] for r in rows] == list(
        range(train["log_every"], steps + 1, train["log_every"])
    )
    for r in rows:
        assert set(r) >= {
            "step",
            "tokens",
            "trained_tokens",
            "fvu",
            "multi_topk_fvu",
            "auxk_loss",
            "dead_fraction",
            "lr",
            "tokens_per_s",
        }
        assert all(np.isfinite(v) for v in r.values())
        batches = r["step"] * train["grad_acc_steps"]
        assert r["tokens"] == batches * train["batch_size"] * ctx
        # Exactly one BOS per row, at position 0: exclude_tokens [2] removes exactly those.
        assert r["trained_tokens"] == batches * train["batch_size"] * (ctx - 1)
        assert r["lr"] == pytest.approx(train["lr"])
    assert rows[-1]["fvu"] < rows[0]["fvu"]


def test_without_bos_exclusion_the_sae_sees_bos(tmp_path, settings, token_dir):
    s = copy.deepcopy(settings)
    s["train"]["exclude_tokens"] = []
    s["tokens"]["train_tokens"] = 8192
    tokens = split_with_manifest(token_dir, tmp_path / "tokens", 64)
    train_layer(typed(s), 1, tokens, tmp_path / "out", tmp_path / "ckpt")
    last = json.loads((tmp_path / "out" / "train_metrics.jsonl").read_text().splitlines()[-1])
    assert last["trained_tokens"] == last["tokens"]


def test_truncated_forward_equals_full_forward(tiny_model, token_dir):
    ids = torch.from_numpy(np.load(token_dir / "eval.npy")[:4].astype(np.int64))
    full = load_model(str(tiny_model), torch.device("cpu"), None, "auto")
    layers = full.config.get_text_config().num_hidden_layers
    for layer in range(layers):
        hook = f"language_model.layers.{layer}"
        cut = load_model(str(tiny_model), torch.device("cpu"), None, "auto")
        assert truncate_after(cut, hook) == layer + 1
        assert len(cut.language_model.layers) == layer + 1
        assert torch.equal(capture(cut, hook, ids), capture(full, hook, ids)), layer


def test_device_choice():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LoupeError, match="no CUDA GPU is available"):
            select_device("cuda")


def test_unconfigured_layer_and_bad_hookpoint(tmp_path, settings, token_dir):
    with pytest.raises(LoupeError, match="layer 99 is not in model.layers"):
        train_layer(typed(settings), 99, token_dir / "train.npy", tmp_path / "o", tmp_path / "c")
    s = copy.deepcopy(settings)
    s["model"]["hookpoint"] = "model.blocks.{layer}"
    with pytest.raises(LoupeError, match="hookpoint 'model.blocks.1' not found"):
        train_layer(typed(s), 1, token_dir / "train.npy", tmp_path / "o", tmp_path / "c")
    assert not (tmp_path / "o" / "sae.safetensors").exists()


def _train_cmd(settings, layer, tokens, out, ckpt, log):
    return [
        sys.executable, "-m", "loupe", "--log", str(log), "train",
        "--config", json.dumps(settings), "--layers", str(layer), "--tokens", str(tokens),
        "--manifest", str(tokens.with_name("manifest.json")), "--out-dir", str(out),
        "--checkpoint-dir", str(ckpt),
    ]  # fmt: skip


@pytest.mark.slow  # over 30 s: outside the fast loop
def test_resume_after_kill_continues_and_matches_uninterrupted(tmp_path, settings, token_dir):
    # Batch 1 with 2-step accumulation: 512 batches, a checkpoint every 8 steps.
    s = copy.deepcopy(settings)
    s["train"].update(batch_size=1, grad_acc_steps=2, save_every=8, log_every=8)
    tokens = token_dir / "train.npy"
    ckpt, log = tmp_path / "ckpt", tmp_path / "train.log"
    kill_after_first_checkpoint(
        _train_cmd(s, 3, tokens, tmp_path / "out", ckpt, log), ckpt / "state" / "state.pt"
    )
    assert not (tmp_path / "out" / "sae.safetensors").exists()

    subprocess.run(_train_cmd(s, 3, tokens, tmp_path / "out", ckpt, log), check=True)
    text = log.read_text()
    resumed_at = int(text.split("resumed layer 3 at batch ")[1].split()[0])
    assert 0 < resumed_at < 512 and resumed_at % 2 == 0  # a step boundary, not batch 0

    train_layer(typed(s), 3, tokens, tmp_path / "ref", tmp_path / "ref_ckpt")
    resumed = [
        json.loads(x) for x in (tmp_path / "out" / "train_metrics.jsonl").read_text().splitlines()
    ]
    reference = [
        json.loads(x) for x in (tmp_path / "ref" / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == list(range(8, 257, 8))
    assert resumed[-1]["tokens"] == reference[-1]["tokens"] == 512 * 128
    assert resumed[-1]["trained_tokens"] == reference[-1]["trained_tokens"] == 512 * 127
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["resumed_from_batch"] == resumed_at and summary["batches"] == 512
    # Same batches in the same order with the optimizer state restored: same weights.
    a = sparsify.SparseCoder.load_from_disk(tmp_path / "out", device="cpu")
    b = sparsify.SparseCoder.load_from_disk(tmp_path / "ref", device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


def test_second_architecture_llama(tmp_path, settings, tiny_model, token_dir):
    """A different architecture needs only a different hookpoint template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaModel(cfg).save_pretrained(tmp_path / "llama")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "llama")
    s = copy.deepcopy(settings)
    s["model"].update(name=str(tmp_path / "llama"), hookpoint="layers.{layer}", layers=[0, 1, 2])
    summary = train_layer(typed(s), 1, token_dir / "train.npy", tmp_path / "out", tmp_path / "ckpt")
    assert summary["hookpoint"] == "layers.1"
    sae = sparsify.SparseCoder.load_from_disk(tmp_path / "out", device="cpu")
    assert sae.d_in == 48 and sae.num_latents == 48 * s["sae"]["expansion_factor"]
    assert summary["final_fvu"] < 1.0


def test_checkpoint_swap_never_leaves_a_torn_checkpoint(tmp_path):
    """A kill between the two renames of a checkpoint swap keeps the previous checkpoint."""
    from loupe.checkpoints import OTHER, RUN_RECORD, STATE, prepare_checkpoint_dir, swap_in

    ckpt = tmp_path / "ckpt"
    run, other_run = {"layers": [1], "settings": {"sae": {"k": 8}}}, {"layers": [1], "settings": {}}
    assert not prepare_checkpoint_dir(ckpt, run)
    for step in (1, 2):
        new = ckpt / ".state.tmp"
        new.mkdir()
        (new / "state.pt").write_text(str(step))
        (new / RUN_RECORD).write_text(json.dumps(run))
        swap_in(new, ckpt / STATE)
    assert (ckpt / STATE / "state.pt").read_text() == "2" and not list(ckpt.glob(".state.*"))
    # Killed after moving the old checkpoint aside, before the new one took its place:
    (ckpt / STATE).rename(ckpt / ".state.old")
    (ckpt / ".state.tmp").mkdir()
    assert prepare_checkpoint_dir(ckpt, run)
    assert (ckpt / STATE / "state.pt").read_text() == "2"
    # Other settings never resume it: it is set aside, whole.
    assert not prepare_checkpoint_dir(ckpt, other_run)
    assert not (ckpt / STATE).exists()
    assert (ckpt / OTHER / "state.pt").read_text() == "2"


@pytest.mark.slow  # over 30 s: outside the fast loop
def test_ctrl_c_during_training_is_one_line_and_resumes(tmp_path, settings, token_dir):
    """Issue 27 #5: Ctrl-C printed a KeyboardInterrupt traceback through sparsify and torch."""
    s = copy.deepcopy(settings)
    s["train"].update(batch_size=1, grad_acc_steps=2, save_every=8, log_every=8)
    tokens, ckpt, log = token_dir / "train.npy", tmp_path / "ckpt", tmp_path / "train.log"
    cmd = _train_cmd(s, 3, tokens, tmp_path / "out", ckpt, log)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (ckpt / "state" / "state.pt").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    line = (
        "loupe train: interrupted (Ctrl-C); nothing finished is lost: run it again (training"
        " resumes from its last checkpoint)"
    )
    assert proc.returncode == 130 and err.strip().splitlines() == [line]
    assert "Traceback" not in log.read_text() and log.read_text().rstrip().endswith(line)
    assert not (tmp_path / "out" / "sae.safetensors").exists()
    subprocess.run(cmd, check=True)
    resumed_at = int(log.read_text().split("resumed layer 3 at batch ")[1].split()[0])
    assert resumed_at > 0 and (tmp_path / "out" / "sae.safetensors").is_file()
