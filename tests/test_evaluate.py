"""Evaluation: every metric matches a direct recomputation, the chunked loss equals the model's
own logits, splicing touches exactly the non-special positions, and a trained SAE clearly beats
an untrained one on reconstruction and on next-token loss."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import demo_config, typed

import loupe.evaluate as ev
from loupe.cli import main as cli_main
from loupe.config import EvaluateConfig
from loupe.errors import LoupeError
from loupe.evaluate import (
    LogitHead,
    ReconStats,
    evaluate_layer,
    evaluate_sae,
    feature_fractions,
    final_hidden,
    keep_mask,
    loss_metrics,
    next_token_losses,
    read_feature_stats,
)
from loupe.metrics import LADDER_COLUMNS, TRANSFER_COLUMNS
from loupe.model import capture, get_hookpoint, import_sparsify, load_model, load_sae
from loupe.tokens import read_tokens_manifest, special_ids

sparsify = import_sparsify()

HOOK = "language_model.layers.2"
METRICS = (
    "fvu",
    "explained_variance",
    "cosine",
    "l0",
    "ce_loss_clean",
    "ce_loss_spliced",
    "delta_ce",
    "ce_loss_zero_ablation",
    "ce_loss_score",
    "kl",
    "kl_zero_ablation",
    "dead_fraction",
    "dense_fraction",
)


def spec(
    batch_size: int = 4,
    max_tokens: int = 1_048_576,
    logit_chunk: int = 256,
    k_ladder: tuple[int, ...] = (),
) -> EvaluateConfig:
    """An evaluate section (the demo's, these keys replaced; no ladder unless asked)."""
    return dataclasses.replace(
        typed(demo_config()).evaluate,
        batch_size=batch_size,
        max_tokens=max_tokens,
        logit_chunk=logit_chunk,
        k_ladder=list(k_ladder),
    )


@pytest.fixture(scope="module")
def model(settings):
    return load_model(settings["model"]["name"], torch.device("cpu"), None, "auto", head=True)


@pytest.fixture(scope="module")
def specials(token_dir) -> list[int]:
    return special_ids(read_tokens_manifest(token_dir / "manifest.json"))


@pytest.fixture(scope="module")
def eval_rows(token_dir) -> np.ndarray:
    return np.load(token_dir / "eval.npy")


def write_stats(path, fire_count: np.ndarray, tokens: int = 10_000, seed: int = 0) -> None:
    """A feature_stats.parquet like maxact's, rows in shuffled order."""
    n = len(fire_count)
    order = np.random.default_rng(seed).permutation(n)
    table = pa.table(
        {
            "feature": pa.array(np.arange(n)[order], pa.int64()),
            "fire_count": pa.array(fire_count[order], pa.int64()),
            "density": pa.array(fire_count[order] / tokens, pa.float64()),
            "max_activation": pa.array(np.ones(n)[order], pa.float32()),
            "mean_activation": pa.array(np.ones(n)[order], pa.float32()),
            "examples": pa.array(np.zeros(n, dtype=np.int64)),
            "tokens": pa.array(np.full(n, tokens, dtype=np.int64)),
        }
    )
    pq.write_table(table, path)


def untrained_like(sae, model, rows: np.ndarray, specials: list[int]):
    """A fresh SAE with the trained one's config, b_dec at the mean activation (the centring
    sparsify's trainer starts from): a fair baseline."""
    ids = torch.from_numpy(rows.astype(np.int64))
    acts = capture(model, HOOK, ids)[keep_mask(ids, specials)].float()
    fresh = sparsify.SparseCoder(sae.d_in, sae.cfg, device="cpu")
    fresh.b_dec.data = acts.mean(0)
    return fresh


# --- pure functions --------------------------------------------------------------------------


def test_logit_head_reproduces_the_models_own_log_probs(model, eval_rows):
    ids = torch.from_numpy(eval_rows[:2].astype(np.int64))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits.log_softmax(-1)
        hidden = final_hidden(model, ids)
        head = LogitHead.of(model)
        got = head.log_probs(hidden.reshape(-1, hidden.shape[-1])).reshape(expected.shape)
        uncapped = LogitHead(head.head, None).log_probs(hidden.reshape(-1, hidden.shape[-1]))
    assert head.softcap == 30.0  # the demo model keeps Gemma 4's final logit softcap
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Without the softcap the numbers differ: the comparison above can fail.
    assert not torch.allclose(uncapped.reshape(expected.shape), expected, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_losses_equal_full_vocab_computation(chunk):
    torch.manual_seed(0)
    head = LogitHead(torch.nn.Linear(8, 50, bias=False), softcap=5.0)
    n = 23
    clean, spliced, zero = (torch.randn(n, 8) * 3 for _ in range(3))
    targets = torch.randint(0, 50, (n,))
    with torch.no_grad():
        sums = next_token_losses(head, clean, spliced, zero, targets, chunk)
        lp = {k: head.log_probs(h) for k, h in (("c", clean), ("s", spliced), ("z", zero))}
    assert sums["ce_clean"] == pytest.approx(float(F.nll_loss(lp["c"], targets, reduction="sum")))
    assert sums["ce_spliced"] == pytest.approx(float(F.nll_loss(lp["s"], targets, reduction="sum")))
    assert sums["ce_zero"] == pytest.approx(float(F.nll_loss(lp["z"], targets, reduction="sum")))
    kl = F.kl_div(lp["s"], lp["c"], log_target=True, reduction="sum")
    kl_zero = F.kl_div(lp["z"], lp["c"], log_target=True, reduction="sum")
    assert sums["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert sums["kl_zero"] == pytest.approx(float(kl_zero), rel=1e-5)
    assert sums["kl"] > 0


def test_recon_stats_match_direct_formulas_across_uneven_batches():
    g = torch.Generator().manual_seed(0)
    # A large common offset, as residual streams have: the variance must not cancel away.
    x = torch.randn(1000, 16, generator=g) + 1e3
    recon = x + 0.3 * torch.randn(1000, 16, generator=g) + 0.1
    active = torch.randint(1, 9, (1000,), generator=g)
    stats = ReconStats()
    for a, b in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        stats.add(x[a:b], recon[a:b], active[a:b])
    got = stats.result()
    xd, rd = x.double(), recon.double()
    err = xd - rd
    total_var = (xd - xd.mean(0)).pow(2).sum()
    assert got["fvu"] == pytest.approx(float(err.pow(2).sum() / total_var), rel=1e-9)
    err_var = (err - err.mean(0)).pow(2).sum()
    assert got["explained_variance"] == pytest.approx(float(1 - err_var / total_var), rel=1e-9)
    # The 0.1 bias counts against fvu but not against explained variance.
    assert got["fvu"] > 1 - got["explained_variance"]
    assert got["cosine"] == pytest.approx(float(F.cosine_similarity(xd, rd).mean()), rel=1e-9)
    assert got["l0"] == pytest.approx(float(active.double().mean()))
    assert stats.n == 1000


def test_keep_mask_drops_every_special_token():
    ids = torch.tensor([[2, 10, 11, 1, 12], [2, 0, 13, 14, 1]])
    assert keep_mask(ids, [0, 1, 2]).tolist() == [
        [False, True, True, False, True],
        [False, False, True, True, False],
    ]


def test_ce_loss_score_is_undefined_when_ablation_does_not_hurt():
    sums = {"ce_clean": 10.0, "ce_spliced": 11.0, "ce_zero": 9.0, "kl": 1.0, "kl_zero": 2.0}
    assert loss_metrics(sums, 2)["ce_loss_score"] is None
    sums["ce_zero"] = 14.0
    m = loss_metrics(sums, 2)
    assert m["ce_loss_score"] == pytest.approx((7 - 5.5) / (7 - 5))
    assert m["delta_ce"] == pytest.approx(0.5)


def test_feature_fractions_from_a_shuffled_stats_table(tmp_path):
    fire = np.array([0, 0, 5, 2000, 1, 0, 30, 1500, 9, 0], dtype=np.int64)
    write_stats(tmp_path / "s.parquet", fire, tokens=10_000)
    fire_count, density = read_feature_stats(tmp_path / "s.parquet", len(fire))
    assert fire_count.tolist() == fire.tolist()  # back in feature order
    got = feature_fractions(fire_count, density, dense_threshold=0.1)
    assert got == {"dead_fraction": 0.4, "dense_fraction": 0.2}
    with pytest.raises(LoupeError, match="another SAE"):
        read_feature_stats(tmp_path / "s.parquet", 12)
    with pytest.raises(LoupeError, match="not found"):
        read_feature_stats(tmp_path / "missing.parquet", 10)


# --- one SAE on the demo ---------------------------------------------------------------------


# `sae` is the rule's input (the SAE's sae.safetensors) or, equally, the SAE's folder.
@pytest.mark.parametrize("sae_path", ["sae.safetensors", "."], ids=["file", "folder"])
def test_evaluate_layer_writes_finite_metrics_for_the_trained_sae(
    tmp_path, settings, token_dir, trained_layer, eval_rows, specials, sae_path
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    fire = np.zeros(sae.num_latents, dtype=np.int64)
    fire[: sae.num_latents // 2] = 100
    fire[:8] = 5000  # 8 features fire on half the tokens: dense
    write_stats(tmp_path / "stats.parquet", fire)
    out = tmp_path / "eval.json"
    evaluate_layer(
        typed(settings),
        2,
        trained_layer / sae_path,
        token_dir / "eval.npy",
        token_dir / "manifest.json",
        tmp_path / "stats.parquet",
        out,
    )
    result = json.loads(out.read_text())
    for key in METRICS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["l0"] == settings["sae"]["k"] == result["k"]
    assert 0 < result["fvu"] < 1 and 0 < result["cosine"] <= 1
    assert result["dead_fraction"] == 0.5
    assert result["dense_fraction"] == 8 / sae.num_latents
    # Every eval row is used (the demo's max_tokens exceeds the fixture's split), and every
    # non-special position counts exactly once; CE has no target at the last position.
    rows = min(len(eval_rows), math.ceil(settings["evaluate"]["max_tokens"] / eval_rows.shape[1]))
    keep = keep_mask(torch.from_numpy(eval_rows[:rows].astype(np.int64)), specials)
    assert result["rows"] == rows == len(eval_rows)
    assert result["tokens"] == int(keep.sum())
    assert result["ce_tokens"] == int(keep[:, :-1].sum())
    # The record names what made it: the output-changing settings evaluate reads, and the
    # evaluated SAE's own config (which must be the configured one).
    m, e = settings["model"], settings["evaluate"]
    assert result["config"] == {
        "model": {k: m[k] for k in ("name", "revision", "hookpoint", "dtype")},
        "evaluate": {
            k: e[k] for k in ("max_tokens", "dense_threshold", "k_ladder", "transfer_models")
        },
    }
    assert {k: result["sae_cfg"][k] for k in settings["sae"]} == settings["sae"]
    assert result["sae_cfg"] == json.loads((trained_layer / "cfg.json").read_text())
    assert result["hookpoint"] == HOOK and result["layer"] == 2


def test_fvu_matches_sparsify_on_a_few_rows(model, trained_layer, eval_rows, specials):
    sae = load_sae(trained_layer, torch.device("cpu"))
    rows = 3
    ctx = eval_rows.shape[1]
    cfg = spec(batch_size=2, max_tokens=rows * ctx - 5, logit_chunk=50)  # 2 + 1 rows
    got = evaluate_sae(model, sae, HOOK, eval_rows, specials, cfg)
    assert got["rows"] == rows
    ids = torch.from_numpy(eval_rows[:rows].astype(np.int64))
    x = capture(model, HOOK, ids)[keep_mask(ids, specials)].float()
    with torch.no_grad():
        direct = sae(x)  # sparsify's own forward: fvu over these tokens
        # Not direct.sae_out: with multi_topk that is the 4k-latent reconstruction.
        enc = sae.encode(x)
        cos = F.cosine_similarity(x, sae.decode(enc.top_acts, enc.top_indices))
    assert got["tokens"] == len(x)
    assert got["fvu"] == pytest.approx(float(direct.fvu), rel=1e-4)
    assert got["cosine"] == pytest.approx(float(cos.mean()), rel=1e-4)


def test_identity_splice_changes_nothing_and_ablation_does(
    monkeypatch, model, trained_layer, eval_rows, specials
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    monkeypatch.setattr(
        ev, "reconstruct", lambda sae, x, k=None: (x.clone(), torch.full(x.shape[:1], 8))
    )
    got = evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(4, 4 * 128, 64))
    assert got["fvu"] == 0 and got["cosine"] == pytest.approx(1.0)
    assert got["ce_loss_spliced"] == pytest.approx(got["ce_loss_clean"], abs=1e-6)
    assert got["kl"] == pytest.approx(0.0, abs=1e-6)
    assert got["kl_zero_ablation"] > 1e-3
    assert got["ce_loss_zero_ablation"] != pytest.approx(got["ce_loss_clean"], abs=1e-4)


def test_trained_sae_reconstructs_better_than_an_untrained_one(
    model, trained_layer, eval_rows, specials
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    cfg = spec(batch_size=16, max_tokens=32 * 128)
    trained = evaluate_sae(model, sae, HOOK, eval_rows, specials, cfg)
    fresh = evaluate_sae(
        model, untrained_like(sae, model, eval_rows[:32], specials), HOOK, eval_rows, specials, cfg
    )
    print({k: (trained[k], fresh[k]) for k in ("fvu", "cosine", "kl", "ce_loss_score")})
    assert trained["fvu"] < 0.9 * fresh["fvu"]
    assert trained["cosine"] > fresh["cosine"] + 0.03
    assert trained["kl"] < fresh["kl"]
    assert fresh["l0"] == trained["l0"] == sae.cfg.k
    # ce_loss_score is not compared here: the demo model is random, its loss is ~log(vocab)
    # whatever layer 2 holds (zero ablation costs ~0.005 nats), so the score is noise. The
    # test below compares it on a briefly trained model.


# --- the sparsity ladder ---------------------------------------------------------------------


def test_ladder_at_the_trained_k_reproduces_the_metrics_exactly(
    model, trained_layer, eval_rows, specials
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    plain = evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(4, 6 * 128, 64))
    laddered = evaluate_sae(
        model, sae, HOOK, eval_rows, specials, spec(4, 6 * 128, 64, (sae.cfg.k, 3))
    )
    rungs = {r["k"]: r for r in laddered.pop("ladder")}
    assert plain == laddered  # the ladder leaves every metric of the trained k as it was
    assert set(rungs) == {3, sae.cfg.k}
    assert rungs[sae.cfg.k] == {"k": sae.cfg.k, **{c.name: plain[c.name] for c in LADDER_COLUMNS}}
    # The ladder's encoder at the trained k is sparsify's encode, bit for bit.
    x = torch.randn(50, sae.d_in)
    a, b = ev.encode_at(sae, x, sae.cfg.k), sae.encode(x)
    assert torch.equal(a.top_acts, b.top_acts) and torch.equal(a.top_indices, b.top_indices)


@pytest.mark.parametrize("k", [2, 21])
def test_ladder_at_another_k_equals_an_independent_top_k(
    k, model, trained_layer, eval_rows, specials
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    rows = 3
    got = evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(2, rows * 128, 50, (k,)))
    (rung,) = got["ladder"]
    ids = torch.from_numpy(eval_rows[:rows].astype(np.int64))
    mask = keep_mask(ids, specials)
    h = capture(model, HOOK, ids)
    x = h[mask].float()
    # The top k of ReLU(W_enc (x - b_dec) + b_enc), decoded by hand.
    with torch.no_grad():
        pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
        acts, idx = pre.topk(k, dim=-1)
        recon = torch.einsum("nk,nkd->nd", acts, sae.W_dec[idx]) + sae.b_dec
        err = x - recon
        fvu = float(err.pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        cos = float(F.cosine_similarity(x, recon).mean())
        # The reconstruction spliced into the full model, its own logits (softcap included).
        module = get_hookpoint(model, HOOK)

        def splice(_m, _i, out):
            hs = (out[0] if isinstance(out, tuple) else out).clone()
            hs[mask] = recon.to(hs.dtype)
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        handle = module.register_forward_hook(splice)
        try:
            logits = model(input_ids=ids).logits.float()
        finally:
            handle.remove()
    at = mask.clone()
    at[:, -1] = False
    ce = F.cross_entropy(logits[at], ids[:, 1:][at[:, :-1]])
    assert rung["k"] == k
    assert rung["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert rung["cosine"] == pytest.approx(cos, rel=1e-5)
    assert rung["l0"] == pytest.approx(float((acts > 0).sum(-1).float().mean()))
    assert rung["ce_loss_spliced"] == pytest.approx(float(ce), rel=1e-5)
    assert rung["delta_ce"] == pytest.approx(float(ce) - got["ce_loss_clean"], abs=1e-5)
    # More latents reconstruct better than the trained k, fewer worse.
    assert (rung["fvu"] < got["fvu"]) == (k > sae.cfg.k)


def test_ladder_rejects_a_k_wider_than_the_sae(model, trained_layer, eval_rows, specials):
    sae = load_sae(trained_layer, torch.device("cpu"))
    with pytest.raises(LoupeError, match="k_ladder's k .* exceeds the SAE's"):
        evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(k_ladder=(sae.num_latents + 1,)))


def test_ladder_needs_a_topk_sae(model, trained_layer, eval_rows, specials):
    sae = load_sae(trained_layer, torch.device("cpu"))
    sae.cfg.activation = "groupmax"  # its k would be the number of groups
    with pytest.raises(LoupeError, match="k_ladder needs a topk SAE; this one is groupmax"):
        evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(k_ladder=(sae.cfg.k, 2)))
    plain = evaluate_sae(model, sae, HOOK, eval_rows, specials, spec(2, 128, 50, (sae.cfg.k,)))
    assert [r["k"] for r in plain["ladder"]] == [sae.cfg.k]  # its own k alone is allowed


# --- transfer to another model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model, small_corpus):
    """The demo's second model: the tiny model after more steps on other text."""
    from loupe.demo import build_transfer_model

    out = tmp_path_factory.mktemp("tuned") / "model_tuned"
    build_transfer_model(tiny_model, small_corpus, out)
    return out


def test_transfer_equals_a_direct_computation_on_the_second_model(
    tmp_path, settings, token_dir, trained_layer, eval_rows, specials, tuned, model, monkeypatch
):
    sae = load_sae(trained_layer, torch.device("cpu"))
    write_stats(tmp_path / "stats.parquet", np.ones(sae.num_latents, dtype=np.int64))
    s = copy.deepcopy(settings)
    s["evaluate"].update(transfer_models=[str(tuned)], k_ladder=[], max_tokens=8 * 128)
    out = tmp_path / "eval.json"
    args = (trained_layer, token_dir / "eval.npy", token_dir / "manifest.json")
    # The job holds one model at a time: the base model is gone when the transfer model loads.
    base, alive_at_transfer_load = [], []

    def open_layer(*a, **kw):
        job = real_open_layer(*a, **kw)
        base.append(weakref.ref(job.model))
        return job

    def load_model(*a, **kw):
        alive_at_transfer_load.append(base[0]() is not None)
        return real_load_model(*a, **kw)

    real_open_layer, real_load_model = ev.open_layer, ev.load_model
    monkeypatch.setattr(ev, "open_layer", open_layer)
    monkeypatch.setattr(ev, "load_model", load_model)
    evaluate_layer(typed(s), 2, *args, tmp_path / "stats.parquet", out)
    assert alive_at_transfer_load == [False]
    result = json.loads(out.read_text())
    (got,) = result["transfer"]
    assert got["model"] == str(tuned)
    assert set(got) == {"model", *(c.name for c in TRANSFER_COLUMNS)}
    # Directly: the second model's own activations through sparsify, its own logits.
    other = load_model(str(tuned), torch.device("cpu"), None, "auto", head=True)
    ids = torch.from_numpy(eval_rows[:8].astype(np.int64))
    mask = keep_mask(ids, specials)
    with torch.no_grad():
        x = capture(other, HOOK, ids)[mask].float()
        logits = other(input_ids=ids).logits.float()
        fvu = float(sae(x).fvu)
        # forward's sae_out uses 4k latents under multi_topk: decode the k kept ones.
        enc = sae.encode(x)
        recon = sae.decode(enc.top_acts, enc.top_indices)

        def splice(_m, _i, out):  # the SAE's reconstruction in the second model's stream
            hs = (out[0] if isinstance(out, tuple) else out).clone()
            hs[mask] = recon.to(hs.dtype)
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        handle = get_hookpoint(other, HOOK).register_forward_hook(splice)
        try:
            spliced = other(input_ids=ids).logits.float()
        finally:
            handle.remove()
    at = mask.clone()
    at[:, -1] = False
    targets = ids[:, 1:][at[:, :-1]]
    ce = float(F.cross_entropy(logits[at], targets))
    ce_spliced = float(F.cross_entropy(spliced[at], targets))
    lp, lq = F.log_softmax(logits[at], -1), F.log_softmax(spliced[at], -1)
    kl = float(F.kl_div(lq, lp, log_target=True, reduction="batchmean"))
    assert got["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert got["ce_loss_clean"] == pytest.approx(ce, rel=1e-5)
    assert got["ce_loss_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert got["delta_ce"] == pytest.approx(ce_spliced - ce, abs=1e-5)
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    # The same SAE on the base model: the second model's numbers differ measurably.
    for key in ("fvu", "ce_loss_clean", "delta_ce"):
        assert abs(got[key] - result[key]) > 0.01 * abs(result[key]), key
    print({k: (result[k], got[k]) for k in ("fvu", "delta_ce", "kl", "ce_loss_clean")})


# --- next-token loss on a model that predicts something --------------------------------------


@pytest.fixture(scope="module")
def learned(tmp_path_factory, settings, tiny_model, token_dir):
    """The tiny model after 100 AdamW steps on the training split (loss ~7.6 -> ~5.5, ~10s
    on CPU), with layer 2's SAE trained on it: (settings, SAE folder)."""
    from helpers import train_layer
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("learned")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    rows = np.load(token_dir / "train.npy")
    for step in range(100):
        start = step * 8 % (len(rows) - 8)
        ids = torch.from_numpy(rows[start : start + 8, :64].astype(np.int64))  # half rows: cheap
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.save_pretrained(root / "model")
    for f in tiny_model.iterdir():
        if "token" in f.name:  # the tokenizer files
            shutil.copy(f, root / "model" / f.name)
    s = copy.deepcopy(settings)
    s["model"]["name"] = str(root / "model")
    train_layer(typed(s), 2, token_dir / "train.npy", root / "layer_2", root / "checkpoints")
    return s, root / "layer_2"


def test_trained_sae_recovers_the_loss_an_untrained_one_loses(learned, eval_rows, specials):
    s, sae_dir = learned
    lm = load_model(s["model"]["name"], torch.device("cpu"), None, "auto", head=True)
    sae = load_sae(sae_dir, torch.device("cpu"))
    cfg = spec(batch_size=16, max_tokens=32 * 128)
    trained = evaluate_sae(lm, sae, HOOK, eval_rows, specials, cfg)
    fresh = evaluate_sae(
        lm, untrained_like(sae, lm, eval_rows[:32], specials), HOOK, eval_rows, specials, cfg
    )
    print({k: (trained[k], fresh[k]) for k in ("fvu", "delta_ce", "ce_loss_score", "kl")})
    # The model learned something, and zeroing layer 2 costs it clearly.
    assert trained["ce_loss_clean"] < math.log(2048) - 1
    assert trained["ce_loss_zero_ablation"] > trained["ce_loss_clean"] + 0.2
    assert trained["ce_loss_score"] > 0.9
    assert 1 - trained["ce_loss_score"] < 0.5 * (1 - fresh["ce_loss_score"])
    assert trained["delta_ce"] < 0.5 * fresh["delta_ce"]
    assert trained["kl"] < 0.5 * fresh["kl"]
    assert trained["fvu"] < 0.5 * fresh["fvu"]


# --- the command line ------------------------------------------------------------------------


def test_cli_rejects_stats_of_another_sae_in_one_line(
    tmp_path, capsys, settings, token_dir, trained_layer
):
    write_stats(tmp_path / "stats.parquet", np.ones(7, dtype=np.int64))
    argv = [
        "--log",
        str(tmp_path / "evaluate.log"),
        "evaluate",
        "--config",
        json.dumps(settings),
        "--layer",
        "2",
        "--sae",
        str(trained_layer / "sae.safetensors"),
        "--tokens",
        str(token_dir / "eval.npy"),
        "--manifest",
        str(token_dir / "manifest.json"),
        "--stats",
        str(tmp_path / "stats.parquet"),
        "--metrics",
        str(tmp_path / "eval.json"),
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cover 7 features, the SAE has 512" in err[0], err
    assert not (tmp_path / "eval.json").exists()
    argv[argv.index("--layer") + 1] = "9"
    assert cli_main(argv) == 2
    assert "layer 9 is not in model.layers" in capsys.readouterr().err


def test_an_sae_whose_cfg_does_not_match_its_weights_is_one_line(
    tmp_path, settings, trained_layer, token_dir, capfd
):
    """Issue 27 #8: torch's state-dict error lists one line per tensor; the CLI prints one."""
    from loupe import cli

    sae = shutil.copytree(trained_layer, tmp_path / "layer_2")
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg["num_latents"] = 2 * (cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"])
    (sae / "cfg.json").write_text(json.dumps(cfg))
    weights = (sae / "sae.safetensors").read_bytes()
    capfd.readouterr()
    code = cli.main(
        [
            "--log", str(tmp_path / "evaluate.log"), "evaluate", "--config", json.dumps(settings),
            "--layer", "2", "--sae", str(sae / "sae.safetensors"),
            "--tokens", str(token_dir / "eval.npy"), "--manifest", str(token_dir / "manifest.json"),
            "--stats", str(tmp_path / "stats.parquet"), "--metrics", str(tmp_path / "eval.json"),
        ]
    )  # fmt: skip
    err = capfd.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"loupe evaluate: error: cannot load SAE from {sae}: RuntimeError:")
    assert "size mismatch for encoder.weight" in err[0] and "size mismatch for W_dec" in err[0]
    assert (sae / "sae.safetensors").read_bytes() == weights
    assert not (tmp_path / "eval.json").exists()
