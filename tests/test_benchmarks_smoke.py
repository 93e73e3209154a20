"""The benchmark runner's code paths on its quick shapes, and the arithmetic of its ratios and
of the GPU-hour projection against hand computations. Benchmarks themselves run on demand
(`python benchmarks/bench.py`), never in the test command."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench, flops, rehearse  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, str, Path]:
    """One quick run, every measurement in this process: (result JSON, markdown, work dir)."""
    root = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--in-process", "--device", "cpu", "--name", "smoke"]
    assert bench.main([*argv, "--work-dir", str(root / "work"), "--out-dir", str(root)]) == 0
    return json.loads((root / "smoke.json").read_text()), (root / "smoke.md").read_text(), root


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # the quick run: over 30 s, outside the fast loop
def test_every_measurement_is_finite_and_positive(quick_run):
    result, markdown, _ = quick_run
    labels = [label for label, _, _ in bench.plan(bench.QUICK)]
    assert list(result["measurements"]) == labels
    for label in labels:
        m = result["measurements"][label]
        assert m["tokens"][1] > m["tokens"][0] > 0, label
        keys = ("seconds_per_token", "tokens_per_s", "x_floor", "peak_rss_mb")
        for key in keys[:2] + keys[3:] if m["floor"] is None else keys:  # top logits: no floor
            assert positive(m[key]), (label, key, m[key])
        # The rate is the difference of the two runs, not either run's average.
        (t0, t1), (s0, s1) = m["tokens"], m["seconds"]
        assert m["seconds_per_token"] == pytest.approx((s1 - s0) / (t1 - t0))
        assert f"| {label} |" in markdown
    # Each stage ran the batches it was sized for: 1 and 16 batches of 16 x 64 tokens; top
    # logits the two vocabulary sizes.
    rows = bench.QUICK.rows * bench.CTX_LEN
    ms = result["measurements"]
    logits = ms.pop(bench.label("top logits"))
    assert logits["tokens"] == list(bench.QUICK.logit_vocab)
    assert positive(logits["flops_per_s"]) and logits["features"] == 512
    for label in labels[1:]:
        if label in ms:
            assert ms[label]["tokens"] == [rows, 16 * rows], label
    assert math.isfinite(ms[bench.label("train alone", layer=0)]["final_fvu"][0])
    assert len(ms[bench.label("train group", n=3)]["final_fvu"]) == 3
    assert math.isfinite(
        ms[bench.label("train alone", layer=0)]["optimizer_step_s"]
    )  # tiny here: noise
    assert ms[bench.label("maxact")]["examples"] > 0
    assert math.isfinite(ms[bench.label("evaluate")]["fvu"])
    assert ms[bench.label("sparsify all", n=3)]["saes"] == 3
    variants = ms[bench.label("sampling pass")]["variants"]
    assert list(variants) == list(bench.SAMPLERS)
    assert all(positive(v["seconds_per_token"]) for v in variants.values())
    sampling = ms[bench.label("sampling pass")]
    assert set(sampling["updates"]) == {"histogram", "interval examples"}
    assert all(positive(v) for v in sampling["updates"].values())
    assert positive(sampling["interval_allocation_s"])
    assert "| no histogram |" in markdown


@pytest.mark.slow  # the quick run: over 30 s, outside the fast loop
def test_projection_is_finite(quick_run):
    p = quick_run[0]["projection"]
    hours = [*p["train_gpu_hours"].values(), p["sample_gpu_hours"], p["eval_gpu_hours"]]
    assert all(positive(h) for h in hours)
    plans = p["train_gpu_hours"]
    # Truncation never costs: the same jobs with the full forward take longer.
    assert plans["one layer per job, full forward (sparsify used plainly)"] > plans[flops.PER_LAYER]
    assert p["train_x_floor"][flops.FLOOR] == 1.0 and p["train_x_per_layer"][flops.PER_LAYER] == 1.0
    assert positive(p["logits_gpu_seconds_per_layer"])
    assert "A quick run" in quick_run[1]


@pytest.mark.slow  # the quick run: over 30 s, outside the fast loop
def test_a_measurement_in_its_own_process(quick_run):
    """The default path: the measurement runs in a child process and its JSON comes back."""
    _, _, root = quick_run
    ctx = bench.fixtures(bench.QUICK, root / "work", "cpu")  # the quick run's inputs, reused
    m = bench.measure(
        bench.label("train alone", layer=0), "train_loupe", {"layers": [0]}, ctx, False
    )
    assert m["tokens"] == [bench.QUICK.rows * bench.CTX_LEN * b for b in bench.QUICK.batches]
    assert positive(m["peak_rss_mb"]) and positive(m["floor"]["encode"])
    assert (root / "work" / "quick" / "logs" / "train--loupe--layer-0.log").exists()


def test_ratios_from_the_floors():
    # Floors per token: forward through 1 layer 1 s, through 3 layers 3 s, encoder 2 s.
    floor = {"forward_1": 1.0, "forward_3": 3.0, "encode": 2.0}
    one = {"seconds_per_token": 7.0, "floor": floor, "layers_run": 1, "saes": 1, "passes": 1}
    d = bench.derive(one)
    assert d["tokens_per_s"] == pytest.approx(1 / 7)
    assert d["x_floor"] == pytest.approx(7 / (1 + 2))
    assert d["b"] == pytest.approx((7 - 1) / 2)
    # Three SAEs on the 3-layer forward: b is per SAE; layer-tokens count every SAE.
    group = {**one, "seconds_per_token": 15.0, "layers_run": 3, "saes": 3}
    d = bench.derive(group)
    assert d["b"] == pytest.approx((15 - 3) / (3 * 2))
    assert d["layer_tokens_per_s"] == pytest.approx(3 / 15)
    # Evaluation: three passes of the forward.
    d = bench.derive({**one, "seconds_per_token": 20.0, "layers_run": 3, "passes": 3})
    assert d["b"] == pytest.approx((20 - 9) / 2)
    assert bench.derive({"seconds_per_token": 2.0, "floor": 1.0})["x_floor"] == 2.0


# Three layers of 1 TFLOP per token and an SAE encoder of 1 TFLOP per token, at 1 TFLOP/s:
# every term is a whole number of seconds per token.
MODEL = flops.ModelFlops(ctx_len=1, base=0.0, layers=[1e12, 1e12, 1e12], lm_head=2e12)
SAE = flops.SaeFlops(d_in=1, num_latents=500_000_000_000, k=1, multi_topk=False)
UNIT = {"model": 1.0, "sae": 1.0}
BUILD = flops.Build(layers=3, train_tokens=3600, sample_tokens=3600, eval_tokens=3600)


def test_training_hours_per_plan():
    hours = lambda b=1.0, **kw: flops.train_hours(MODEL, SAE, b, BUILD, UNIT, **kw)  # noqa: E731
    assert hours() == pytest.approx(9.0)  # (1+1) + (2+1) + (3+1) s per token, 3600 tokens
    assert hours(truncate=False) == pytest.approx(12.0)  # 3 x (3+1)
    assert hours(group_size=3) == pytest.approx(6.0)  # one 3-layer forward, three SAEs
    assert hours(group_size=2) == pytest.approx(7.0)  # as loupe groups: [0]: 1+1; [1, 2]: 3+2
    assert hours(b=2.0) == pytest.approx(12.0)  # doubling b adds one encoder per SAE


def test_sampling_evaluation_and_memory():
    assert flops.sample_hours(MODEL, SAE, 1.0, BUILD, UNIT) == pytest.approx(9.0)
    # Per layer: 3 passes x (3 layers + 2 LM head) + 1 encoder = 16 s per token, 3 layers.
    assert flops.eval_hours(MODEL, SAE, 1.0, BUILD, UNIT) == pytest.approx(48.0)
    assert flops.largest_group(gpu_gb=80, model_gb=10, per_sae_gb=2.5, work_gb=8) == 24


def test_flop_formulas():
    assert flops.attended_positions(4, None) == pytest.approx(2.5)  # 1+2+3+4 over 4
    assert flops.attended_positions(4, 2) == pytest.approx(1.75)  # 1+2+2+2 over 4
    sae = flops.real_sae()
    assert sae.num_latents == 49152
    assert sae.encode == 2 * 1536 * 49152
    assert sae.train == pytest.approx(3 * sae.forward)


def test_counted_layer_flops_match_the_layer_shapes():
    """The meta-tensor count of a small Gemma 4 equals its matmuls written out by hand."""
    d, inter, heads, hd, ghd, p, window, ctx = 64, 128, 2, 16, 32, 8, 4, 8
    text = dict(
        vocab_size=256,
        vocab_size_per_layer_input=256,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=3,
        num_kv_shared_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=hd,
        global_head_dim=ghd,
        hidden_size_per_layer_input=p,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
        use_double_wide_mlp=True,
    )
    counted = flops.count_e2b_flops(ctx_len=ctx, text=text)
    sliding = (
        2 * d * heads * hd * 2  # q and o projections
        + 2 * d * hd * 2  # k and v (one KV head)
        + 3 * 2 * d * inter  # gated MLP
        + 2 * 2 * d * p  # per-layer input gate and projection
        + 4 * heads * hd * flops.attended_positions(ctx, window)
    )
    assert counted.layers[0] == pytest.approx(sliding)
    # The KV-shared last layer computes no k/v and has the double-wide MLP.
    shared = 2 * d * heads * ghd * 2 + 3 * 2 * d * 2 * inter + 2 * 2 * d * p
    shared += 4 * heads * ghd * flops.attended_positions(ctx, None)
    assert counted.layers[2] == pytest.approx(shared)
    assert counted.prefix(0) < counted.prefix(1) < counted.full
    assert counted.lm_head == 2 * d * 256


def test_neighbours_cost_at_a_small_width(tmp_path):
    """--neighbours' code path on a small "gemma" shape, and its projection arithmetic."""
    shape = dict(features=320, d=32, layers=35, top_n=10, chunk=64, k=4, windows=10, window=5)
    r = bench.neighbours_cost(tmp_path, repeats=1, gemma=shape)["gemma"]
    blocks = 5  # 320 / 64
    assert r["product_tflop"] == pytest.approx(2 * 320**2 * 32 / 1e12)
    assert r["cpu_product_s"] == pytest.approx(blocks * r["block_s"])
    assert r["cpu_suite_h"] == pytest.approx((35 * 3 - 2) * r["cpu_product_s"] / 3600)
    assert r["h100_product_s"] == pytest.approx(2 * 320**2 * 32 / (flops.RATES["fp32"] * 1e12))
    assert r["file_rows"] == 3 * 10 * 320 and positive(r["file_bytes"])
    assert r["flow_pool_tokens"] == 50 and positive(r["flow_pair_s"])
    assert positive(r["block_s"]) and positive(r["block_matmul_s"])
    assert "| one layer (3 products), this CPU |" in (tmp_path / "neighbours.md").read_text()


def test_switching_samplers_off_leaves_the_others_unchanged(settings, token_dir, trained_layer):
    """The benchmark times the pass without the histogram and the interval examples (its
    samplers_off, in its own process: stream has no switch for it): what remains keeps exactly
    the values of the full pass, and the real samplers are back afterwards."""
    import numpy as np
    import torch
    from helpers import typed

    import loupe.maxact
    from loupe.maxact import stream
    from loupe.model import load_model, load_sae, truncate_after

    layer, special = 2, [0, 1, 2]  # the layer trained_layer trains; the demo's pad, eos, bos
    hookpoint = settings["model"]["hookpoint"].format(layer=layer)
    model = load_model(settings["model"]["name"], torch.device("cpu"), None, "auto")
    truncate_after(model, hookpoint)
    sae = load_sae(trained_layer, torch.device("cpu"))
    tokens = np.load(token_dir / "sample.npy")[:32]
    spec = typed(settings).maxact
    full = stream(model, sae, hookpoint, tokens, spec, special)
    with bench.samplers_off(bench.SAMPLERS["neither"]):
        bare = stream(model, sae, hookpoint, tokens, spec, special)
    assert isinstance(bare.interval_examples, bench.KeepsNothing)
    assert isinstance(bare.histogram, bench.KeepsNothing)
    assert loupe.maxact.ActivationHistogram is not bench.KeepsNothing
    assert int(full.histogram.counts.sum()) > 0
    for name, value in full.top.cpu().items():
        assert np.array_equal(value, bare.top.cpu()[name]), name
    for name in ("count", "total", "peak"):
        assert torch.equal(getattr(full.stats, name), getattr(bare.stats, name)), name
    assert full.stats.tokens == bare.stats.tokens > 0


@pytest.mark.slow  # the rehearsal at the demo's width: about 3 minutes on 2 shared cores
def test_rehearsal_runs_every_stage(tmp_path):
    """rehearse.py --quick: every stage ran in its own process and wrote its files; the staged
    repo's sizes add up; the browser's views finished; the projections' arithmetic."""
    argv = ["--quick", "--threads", "1", "--work-dir", str(tmp_path / "work")]
    assert rehearse.main([*argv, "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "rehearsal-quick.json").read_text())
    labels = [label for label, _, _ in rehearse.plan({})]
    assert result["meta"]["stages"] == labels
    for label in labels:
        m = result["stages"][label]
        assert positive(m["wall_s"]) and positive(m["peak_rss_mb"]), label
        assert all(size > 0 for size in m.get("files", {}).values()), label
    stages = result["stages"]
    for layer in rehearse.LAYERS:
        assert set(stages[f"maxact, layer {layer}"]["files"]) == set(rehearse.MAXACT_FILES)
        logits = stages[f"maxact, layer {layer}"]["top_logits"]
        assert logits["vocab"] == logits["full_vocab"] // rehearse.QUICK.logit_slice
        want = logits["seconds"] * rehearse.QUICK.logit_slice
        assert logits["projected_full_vocab_s"] == pytest.approx(want, rel=1e-3)
        assert stages[f"explain, layer {layer}"]["result"]["ok"] == rehearse.QUICK.explain_features
    # The repo: a layer's files, the shared rest, and 35 layers of them.
    repo = result["repo"]
    assert repo["per_layer_bytes"] == sum(repo["layer_bytes"].values())
    assert repo["total_35_bytes"] == repo["shared_bytes"] + 35 * repo["per_layer_bytes"]
    staged = tmp_path / "work" / "quick" / "hub"
    on_disk = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file())
    assert stages[rehearse.STAGE]["files"]["repo (2 layers)"] == on_disk
    assert {"sae.safetensors", "max_activations", "saelens sae_weights.safetensors"} <= set(
        repo["layer_bytes"]
    )
    views = stages["browser (headless chromium)"].get("views")
    if views is not None:  # chromium installed
        assert all(v["status"] == "ready" for v in views.values()), views
        assert views["first feature"]["requests"] > 0
        assert 0 < views["token search"]["max_in_flight"] <= 6
        assert views["token search"]["features_found"] > 0
    cpu = result["projection"]["cpu_hours"]
    assert all(math.isfinite(h) and h >= 0 for h in cpu.values())
    assert "| stage (with the SAELens copy) |" in (tmp_path / "rehearsal-quick.md").read_text()
