"""The model card's SAELens recipe: one published layer as SAELens' TopK SAE (sae-lens 6.54.12).

Card contract (as for quickstart.py): the `# %% saelens` cell is the card's code block (this
header is not shown), as is except for the values of the lines `REPO = ...`, `PREFIX = ...`,
`LAYER_MODULE = ...` and `LAYER = ...` (one assignment per line, starting at column 0, a
trailing comment kept), which the card renderer replaces with the suite's own.
"""

# %% saelens
import json
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from sae_lens import TopKSAE, TopKSAEConfig
from safetensors.torch import load_file

REPO = "rhizomatous/gemma-loupe"
PREFIX = "sae-gemma-4-E2B-32x-1B"  # the suite's folder in the repo
LAYER_MODULE = "language_model.layers.{layer}"  # an SAE's folder: the module it reads
LAYER = 17
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Only this layer's folder: cfg.json and sae.safetensors (sparsify's format).
folder = f"{PREFIX}/{LAYER_MODULE.format(layer=LAYER)}"
root = Path(snapshot_download(REPO, allow_patterns=[f"{folder}/*"]))
cfg = json.loads((root / folder / "cfg.json").read_text())
weights = load_file(root / folder / "sae.safetensors")

# SAELens' own `sparsify_disk_loader` does not load these folders correctly yet: it reads the
# width from `num_latents` even when sparsify wrote 0 there (meaning d_in * expansion_factor),
# it transposes `W_dec` although sparsify already stores it as [num_latents, d_in], and it sets
# `apply_b_dec_to_input = not normalize_decoder` while sparsify always subtracts `b_dec` before
# encoding. Built from the weights, SAELens' TopK SAE encodes and decodes exactly as sparsify.
num_latents = cfg["num_latents"] or cfg["d_in"] * cfg["expansion_factor"]
sae = TopKSAE(
    TopKSAEConfig(
        d_in=cfg["d_in"],
        d_sae=num_latents,
        k=cfg["k"],
        apply_b_dec_to_input=True,
        dtype="float32",
        device=DEVICE,
    )
)
sae.load_state_dict(
    {
        "W_enc": weights["encoder.weight"].T,  # [d_in, num_latents]
        "b_enc": weights["encoder.bias"],  # [num_latents]
        "W_dec": weights["W_dec"],  # [num_latents, d_in]
        "b_dec": weights["b_dec"],  # [d_in]
    }
)
sae.eval()

# sae.encode(acts): [..., num_latents], k nonzeros per token; sae.decode(that): [..., d_in].
# acts: the output of the module LAYER_MODULE names (the residual stream), in float32.
print(f"layer {LAYER}: d_in {sae.cfg.d_in}, {sae.cfg.d_sae} latents, k = {sae.cfg.k}")
