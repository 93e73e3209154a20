"""The model card's quick start: load the SAEs, encode text, browse a feature's examples.

Card contract: each `# %% name` cell becomes one python code block of the card (the text above
the first cell is not shown), as is except for the values of the lines `REPO = ...`,
`PREFIX = ...`, `LAYER_MODULE = ...`, `LAYERS = ...`, `LAYER = ...` and `MODEL = ...` (one
assignment per line, starting at column 0), which the card renderer replaces with the suite's
own. The cells run in order in one namespace; tests run them against a staged repo.
"""
# ruff: noqa: E402  (each cell imports what it uses, as the card shows them one by one)

# %% load
import torch
from sparsify import SparseCoder

REPO = "rhizomatous/gemma-loupe"
PREFIX = "sae-gemma-4-E2B-32x-1B"  # the suite's folder in the repo
LAYER_MODULE = "language_model.layers.{layer}"  # an SAE's folder: the module it reads
LAYERS = range(35)
LAYER = 17
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

hookpoint = LAYER_MODULE.format(layer=LAYER)
sae = SparseCoder.load_from_hub(REPO, hookpoint=f"{PREFIX}/{hookpoint}", device=DEVICE)
print(sae.cfg.k, sae.num_latents)

# %% load_all
hookpoints = [f"{PREFIX}/{LAYER_MODULE.format(layer=i)}" for i in LAYERS]
pattern = f"{PREFIX}/{LAYER_MODULE.format(layer='*')}"
saes = SparseCoder.load_many(REPO, layers=hookpoints, pattern=pattern, device=DEVICE)
assert len(saes) == len(LAYERS)

# %% encode
from transformers import AutoModel, AutoTokenizer

MODEL = "google/gemma-4-E2B"
tokenizer = AutoTokenizer.from_pretrained(MODEL)
dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
model = AutoModel.from_pretrained(MODEL, dtype=dtype).to(DEVICE).eval()

ids = tokenizer("The Eiffel Tower is in Paris.", return_tensors="pt").input_ids
if ids[0, 0] != tokenizer.bos_token_id:  # training rows always start with BOS
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)

captured = []
hook = model.get_submodule(hookpoint).register_forward_hook(
    lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
)
with torch.inference_mode():
    model(input_ids=ids.to(DEVICE))
    hook.remove()
    acts = captured[0][0, 1:].float()  # [seq, d_in]; BOS dropped (never seen in training)
    out = sae.encode(acts)  # top_acts, top_indices: [seq, k], unsorted

tokens = tokenizer.convert_ids_to_tokens(ids[0, 1:])
for token, values, features in zip(tokens, out.top_acts, out.top_indices, strict=True):
    order = values.argsort(descending=True)[:5]
    print(f"{token!r:>16}", [(int(features[o]), round(float(values[o]), 2)) for o in order])

# %% examples
import json

import polars as pl
from huggingface_hub import hf_hub_url


def scan(folder: str) -> pl.LazyFrame:
    """LAYER's file in `folder`, read in place: polars fetches the footer, then only the row
    groups a filter on `feature` can match (HTTP range requests, no download of the file)."""
    return pl.scan_parquet(hf_hub_url(REPO, f"{PREFIX}/{folder}/layer_{LAYER}.parquet"))


# The strongest feature on the text among those with examples (dead features have none).
live = scan("feature_stats").filter(pl.col("examples") > 0).select("feature").collect()
live = set(live["feature"].to_list())
ranked = out.top_indices.flatten()[out.top_acts.flatten().argsort(descending=True)].tolist()
feature = next(f for f in ranked if f in live)
examples = scan("max_activations").filter(pl.col("feature") == feature).sort("rank").collect()

# [[peak]], [other active tokens]
for row in examples.head(5).iter_rows(named=True):
    window, values = json.loads(row["context_tokens"]), json.loads(row["token_activations"])
    text = "".join(
        f"[[{t}]]" if i == row["peak_index"] else f"[{t}]" if v > 0 else t
        for i, (t, v) in enumerate(zip(window, values, strict=True))
    )
    print(f"{row['activation']:8.2f}  {text!r}")
