"""The published SAEs in the other libraries users reach for, with the real packages, on the
demo's staged repo: SAELens loads the staged SAELens copies by repo id (the card's one line),
from disk, and by release name through the staged registry entry, each encoding and
reconstructing like sparsify; the card's SAEBench check passes; the card's delphi recipe
caches activations whose peaks are loupe's max-activating examples."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, demo_tokens

from loupe.card import code_cells, fill_constants
from loupe.model import import_sparsify

sparsify = import_sparsify()

RECIPES = REPO / "workflow/loupe/assets/recipes"
HOOKPOINT = "language_model.layers.{layer}"


# --- helpers --------------------------------------------------------------------------------


def substitute(source: str, **values: str) -> str:
    """`source` with each `NAME = ...` line given a new value (a Python expression): for the
    values only a test changes (its token rows, a scratch folder)."""
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", source, flags=re.M)
        assert n == 1, f"{name}: {n} assignment lines"
    return source


def run_recipe(name: str, suite: dict, tmp_path: Path, **overrides: str) -> tuple[dict, str]:
    """Run the recipe's card block as the card renderer fills it in for `suite` (the values of
    its constant lines), with `overrides` on top; returns its globals and printed output."""
    cells = code_cells(fill_constants((RECIPES / name).read_text(), suite))
    assert len(cells) == 1, sorted(cells)
    path = tmp_path / name
    path.write_text(substitute(next(iter(cells.values())), **overrides))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        namespace = runpy.run_path(str(path), run_name="__main__")
    return namespace, out.getvalue()


@pytest.fixture()
def local_hub(monkeypatch, tmp_path):
    """huggingface_hub's snapshot_download replaced at its boundary by one that serves a local
    folder given in place of the repo id, honouring allow_patterns like the Hub; returns the
    list of files each call delivered."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    served: list[list[str]] = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        root = Path(repo_id)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        wanted = list(filter_repo_objects(files, allow_patterns=allow_patterns))
        snap = tmp_path / f"snapshot{len(served)}"
        snap.mkdir()
        for rel in wanted:
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, snap / rel)
        served.append(wanted)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return served


@pytest.fixture(scope="module")
def hub(demo_run) -> Path:
    return demo_run / "results/hub"


@pytest.fixture(scope="module")
def prefix(hub) -> str:
    """The suite's folder: the one folder of the repo that holds SAE folders."""
    found = {p.parent.parent.name for p in hub.glob("*/language_model.layers.*/cfg.json")}
    assert len(found) == 1, found
    return found.pop()


@pytest.fixture(scope="module")
def layers(hub, prefix) -> list[int]:
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in (hub / prefix).glob("*.layers.*"))


@pytest.fixture(scope="module")
def model_dir(demo_run) -> Path:
    return demo_run / "results/demo/model"


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sample(demo_run) -> np.ndarray:
    """The sample split loupe's examples come from: [rows, ctx] uint32."""
    return np.load(demo_run / demo_tokens() / "sample.npy", mmap_mode="r")


@pytest.fixture(scope="module")
def special_ids(demo_run) -> list[int]:
    """BOS, EOS and PAD: the tokens loupe never lets peak."""
    manifest = json.loads((demo_run / demo_tokens() / "manifest.json").read_text())
    ids = {manifest.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def layer_outputs(model, layer: int, ids: np.ndarray) -> torch.Tensor:
    """Decoder layer `layer`'s output (the residual stream) for token rows: [rows, ctx, d]."""
    seen = []
    module = model.get_submodule(HOOKPOINT.format(layer=layer))
    handle = module.register_forward_hook(
        lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    finally:
        handle.remove()
    return seen[0]


def sparsify_dense(sae, x: torch.Tensor) -> torch.Tensor:
    """sparsify's TopK activations as [n, num_latents], zeros off the top k."""
    out = sae.encode(x)
    dense = x.new_zeros(x.shape[0], sae.num_latents)
    return dense.scatter_(1, out.top_indices, out.top_acts)


# --- SAELens --------------------------------------------------------------------------------


@pytest.fixture()
def hub_cache(monkeypatch, tmp_path):
    """huggingface_hub's own cache, pointed at a scratch folder: `serve(root, repo_id)` lays a
    staged repo into it as a download of `repo_id` would (refs/main -> a snapshot), so the
    real hf_hub_download resolves it offline (HF_HUB_OFFLINE is set for every test)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def serve(root: Path, repo_id: str, under: str) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        for path in (root / under).rglob("*"):
            if path.is_file():
                dest = repo / "snapshots" / commit / path.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest)

    return serve


@pytest.fixture(scope="module")
def repo_id(config) -> str:
    """The demo's hub repo id: the card fills it in as the release."""
    return config["hub"]["repo"]


def saelens_folder(prefix: str, layer: int) -> str:
    return f"{prefix}/saelens/{HOOKPOINT.format(layer=layer)}"


def assert_same_sae(sae, reference, real: torch.Tensor, layer: int) -> None:
    """SAELens' `sae` encodes and decodes like sparsify's `reference` within 1e-5, on the
    layer's real activations and inputs drawn around them (so other latents win too)."""
    torch.manual_seed(layer)
    drawn = real.mean(0) + torch.randn(256, reference.d_in) * real.std(0)
    x = torch.cat([real, drawn])
    with torch.inference_mode():
        want = sparsify_dense(reference, x)
        got = sae.encode(x)
        # decode(encode(x)): forward's sae_out is the multi-TopK (4k) reconstruction.
        want_recon = reference.decode(*reference.encode(x)[:2])
        got_recon = sae.decode(got)
    assert torch.equal(got != 0, want != 0), f"layer {layer}: other latents chosen"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_recon, want_recon, atol=1e-5, rtol=0)
    assert (want != 0).sum(1).float().mean() > reference.cfg.k / 2  # the test has teeth


@pytest.mark.e2e
def test_saelens_loads_every_layer_by_repo_id_like_sparsify(
    hub, prefix, layers, model, sample, repo_id, hub_cache, tmp_path
):
    """The card's one line, `SAE.from_pretrained(release=<repo id>, sae_id=<folder>)`, through
    the real Hub client (offline, from its cache), builds each layer's SAE as sparsify has it;
    SAE.load_from_disk on the staged folder does too; the sparsity file is the log10 density."""
    import polars as pl
    from sae_lens import SAE, TopKSAE
    from safetensors.torch import load_file

    hub_cache(hub, repo_id, f"{prefix}/saelens")
    rows = sample[:4]
    for layer in layers:
        folder = saelens_folder(prefix, layer)
        suite = {"REPO": repo_id, "SAE_ID": folder}
        ns, printed = run_recipe("saelens_load.py", suite, tmp_path)
        reference = (
            sparsify.SparseCoder.load_from_disk(hub / prefix / HOOKPOINT.format(layer=layer))
            .float()
            .eval()
        )
        real = layer_outputs(model, layer, rows).reshape(-1, reference.d_in).float()
        from_disk = SAE.load_from_disk(hub / folder)
        for sae in (ns["sae"], from_disk):
            assert isinstance(sae, TopKSAE)
            assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (
                reference.d_in,
                reference.num_latents,
                reference.cfg.k,
            )
            assert_same_sae(sae, reference, real, layer)
        meta = ns["sae"].cfg.metadata
        assert meta.hook_name == f"blocks.{layer}.hook_resid_post" in printed
        assert meta.hf_hook_name == HOOKPOINT.format(layer=layer)
        assert meta.context_size == 128 and meta.model_name == "results/demo/model"

        stats = pl.read_parquet(hub / prefix / f"feature_stats/layer_{layer}.parquet")
        sparsity = load_file(hub / folder / "sparsity.safetensors")["sparsity"]
        assert sparsity.shape == (reference.num_latents,)
        want = np.log10(stats.sort("feature")["density"].to_numpy() + 1e-10)
        np.testing.assert_allclose(sparsity.numpy(), want, rtol=1e-6)


@pytest.mark.e2e
def test_registry_entry_loads_the_suite_by_release_name(
    hub, prefix, layers, repo_id, hub_cache, monkeypatch, tmp_path
):
    """The staged pretrained_saes.yaml, read by SAELens' own registry reader in place of its
    packaged one, makes every layer load by release name; its l0 and variance_explained are
    metrics.csv's."""
    import yaml
    from sae_lens import SAE
    from sae_lens.loading import pretrained_saes_directory as directory

    entry = yaml.safe_load((hub / prefix / "saelens/pretrained_saes.yaml").read_text())
    (release,) = entry
    assert entry[release]["repo_id"] == repo_id and entry[release]["conversion_func"] is None
    rows = {row["id"]: row for row in entry[release]["saes"]}
    assert list(rows) == [saelens_folder(prefix, layer) for layer in layers]
    with open(hub / prefix / "metrics.csv", newline="") as f:
        metrics = {int(float(r["layer"])): r for r in csv.DictReader(f)}
    for layer in layers:
        row = rows[saelens_folder(prefix, layer)]
        assert row["path"] == saelens_folder(prefix, layer)
        assert row["l0"] == pytest.approx(float(metrics[layer]["l0"]), abs=1e-4)
        want = float(metrics[layer]["explained_variance"])
        assert row["variance_explained"] == pytest.approx(want, abs=1e-4)
        assert re.fullmatch(rf"[a-z0-9-]+/{layer}-[a-z0-9-]+", row["neuronpedia"])

    (tmp_path / "pretrained_saes.yaml").write_text(yaml.safe_dump(entry))
    monkeypatch.setattr(directory, "files", lambda package: tmp_path)
    directory.get_pretrained_saes_directory.cache_clear()
    hub_cache(hub, repo_id, f"{prefix}/saelens")
    try:
        for layer in (layers[0], layers[-1]):
            sae_id = saelens_folder(prefix, layer)
            sae, cfg, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id)
            assert cfg["metadata"]["neuronpedia_id"] == rows[sae_id]["neuronpedia"]
            assert sparsity is not None and sparsity.shape == (sae.cfg.d_sae,)
    finally:
        directory.get_pretrained_saes_directory.cache_clear()


@pytest.mark.e2e
def test_saebench_check_runs_on_every_layer_and_reports_the_decoder_norms(
    hub, prefix, layers, repo_id, hub_cache, tmp_path
):
    """The card's check passes its interface assertions on every layer and reports whether the
    decoder rows are unit norm as an independent computation on sparsify's weights finds."""
    from safetensors.torch import load_file

    hub_cache(hub, repo_id, f"{prefix}/saelens")
    for layer in layers:
        suite = {"REPO": repo_id, "SAE_ID": saelens_folder(prefix, layer)}
        ns, printed = run_recipe("saebench_check.py", suite, tmp_path)
        weights = load_file(hub / prefix / HOOKPOINT.format(layer=layer) / "sae.safetensors")
        norms = weights["W_dec"].norm(dim=1)
        unit = bool((norms - 1).abs().max() <= 1e-5)
        assert f"unit-norm decoder rows: {unit} ({norms.min():.3f} to {norms.max():.3f})" in printed
        torch.testing.assert_close(ns["norms"], norms)


def test_saebench_check_tells_unit_norm_decoders_apart(tmp_path, monkeypatch):
    """The card's check has teeth: a random decoder is reported as not unit norm, the same
    decoder with its rows normalized as unit norm."""
    from sae_lens import SAE, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    meta = SAEMetadata(model_name="m", hook_name="blocks.0.hook_resid_post")
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=4, dtype="float32", metadata=meta))
    with torch.no_grad():
        sae.W_dec.normal_()
    monkeypatch.setattr(SAE, "from_pretrained", classmethod(lambda cls, **kw: sae))
    suite = {"REPO": "a/b", "SAE_ID": "x"}
    _, printed = run_recipe("saebench_check.py", suite, tmp_path)
    assert "unit-norm decoder rows: False" in printed
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    _, printed = run_recipe("saebench_check.py", suite, tmp_path)
    assert "unit-norm decoder rows: True" in printed


@pytest.mark.e2e
def test_staged_cfg_json_states_the_real_num_latents(hub, prefix, layers):
    from safetensors import safe_open

    for layer in layers:
        folder = hub / prefix / HOOKPOINT.format(layer=layer)
        cfg = json.loads((folder / "cfg.json").read_text())
        with safe_open(folder / "sae.safetensors", framework="pt") as f:
            width = f.get_slice("encoder.weight").get_shape()[0]
        assert cfg["num_latents"] == width, (
            f"{folder.name}/cfg.json has num_latents {cfg['num_latents']}, the SAE has {width}"
            " latents: SAELens' sparsify loaders read num_latents as the width (0 -> a 0-latent"
            " SAE); write the real width into cfg.json"
        )
        assert cfg["d_in"] * cfg["expansion_factor"] == width


@pytest.mark.e2e
def test_sparsify_loads_a_cfg_with_num_latents_set_identically(hub, prefix, layers, tmp_path):
    """The fix for the test above is safe: sparsify reads num_latents = the width exactly as it
    reads num_latents = 0; SAELens' own loader still fails (why the recipe builds the SAE)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    layer = layers[len(layers) // 2]
    staged = hub / prefix / HOOKPOINT.format(layer=layer)
    cfg = json.loads((staged / "cfg.json").read_text())
    fixed = tmp_path / "fixed" / staged.name
    fixed.mkdir(parents=True)
    shutil.copy(staged / "sae.safetensors", fixed / "sae.safetensors")
    width = cfg["d_in"] * cfg["expansion_factor"]
    (fixed / "cfg.json").write_text(json.dumps({**cfg, "num_latents": width}))

    a = sparsify.SparseCoder.load_from_disk(staged)
    b = sparsify.SparseCoder.load_from_disk(fixed)
    assert a.num_latents == b.num_latents == width
    assert b.cfg.expansion_factor == cfg["expansion_factor"] and b.cfg.num_latents == width
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    torch.manual_seed(0)
    x = torch.randn(64, a.d_in) * 3
    with torch.inference_mode():
        out_a, out_b = a.encode(x), b.encode(x)
        assert torch.equal(out_a.top_acts, out_b.top_acts)
        assert torch.equal(out_a.top_indices, out_b.top_indices)
        assert torch.equal(a.decode(*out_a[:2]), b.decode(*out_b[:2]))

    with pytest.raises(RuntimeError, match="size mismatch for W_dec"):
        SAE.load_from_disk(fixed, converter=sparsify_disk_loader)


# --- delphi ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_delphi_recipe_finds_loupes_top_examples(
    hub, prefix, layers, model_dir, sample, special_ids, local_hub, tmp_path
):
    """delphi caches every activation of the rows it is given; on the rows that hold loupe's
    top examples, each feature's highest activation (special tokens aside, as loupe skips
    them) is loupe's top example: same row, same position, same value."""
    import polars as pl

    layer = layers[len(layers) // 2]
    top = (
        pl.read_parquet(hub / prefix / f"max_activations/layer_{layer}.parquet")
        .filter(pl.col("rank") == 0)
        .sort("feature")
    )
    # 16 rows (two delphi batches of 8): the first 16 distinct rows holding a top example.
    rows = sorted(set(top["sequence"].to_list()))[:16]
    assert len(rows) == 16
    checked = top.filter(pl.col("sequence").is_in(rows))
    tokens = torch.from_numpy(np.asarray(sample[rows], dtype=np.int64))
    torch.save(tokens, tmp_path / "tokens.pt")

    suite = {
        "REPO": str(hub),
        "PREFIX": prefix,
        "LAYER_MODULE": HOOKPOINT,
        "LAYER": layer,
        "MODEL": str(model_dir),
    }
    ns, printed = run_recipe(
        "delphi_cache.py",
        suite,
        tmp_path,
        SAVE_DIR=f"Path({str(tmp_path / 'latents')!r})",
        # The recipe's own rows are built from example text; here, loupe's sample rows.
        tokens=f"torch.load({str(tmp_path / 'tokens.pt')!r})",
    )
    hookpoint = HOOKPOINT.format(layer=layer)
    assert local_hub == [
        [f"{prefix}/{hookpoint}/cfg.json", f"{prefix}/{hookpoint}/sae.safetensors"]
    ]
    assert torch.equal(ns["tokens"], tokens)
    locations = ns["locations"]  # [nonzeros, 3]: row, position, latent
    activations = ns["activations"]
    assert f"{len(activations)} activations over {tokens.numel()} tokens" in printed
    assert (tmp_path / "latents" / hookpoint / "config.json").is_file()
    assert list((tmp_path / "latents" / hookpoint).glob("*.safetensors"))

    row, pos, latent = locations.unbind(1)
    counted = ~torch.isin(tokens[row, pos], torch.tensor(special_ids))
    assert (pos[counted] >= 1).all()  # BOS starts every row and is not counted
    for feature, sequence, position, value in checked.select(
        "feature", "sequence", "position", "activation"
    ).iter_rows():
        mine = counted & (latent == feature)
        best = int(activations[mine].argmax())
        at_row, at_pos = int(row[mine][best]), int(pos[mine][best])
        assert (rows[at_row], at_pos) == (sequence, position), f"feature {feature}"
        assert abs(float(activations[mine][best]) - value) <= 1e-4, f"feature {feature}"
    assert checked.height >= 16
