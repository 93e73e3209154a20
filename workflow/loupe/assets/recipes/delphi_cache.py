"""The model card's delphi recipe: cache one layer's feature activations with EleutherAI delphi
(eai-delphi 0.1.3), the first step of its automatic interpretation pipeline.

Card contract (as for quickstart.py): the `# %% delphi` cell is the card's code block (this
header is not shown), as is except for the values of the lines `REPO = ...`, `PREFIX = ...`,
`LAYER_MODULE = ...`, `LAYER = ...` and `MODEL = ...` (one assignment per line, starting at
column 0, a trailing comment kept), which the card renderer replaces with the suite's own.
"""

# %% delphi
from pathlib import Path

import torch
from delphi.config import CacheConfig
from delphi.latents import LatentCache
from delphi.sparse_coders.load_sparsify import load_sparsify_hooks
from huggingface_hub import snapshot_download
from transformers import AutoModel, AutoTokenizer

REPO = "rhizomatous/gemma-loupe"
PREFIX = "sae-gemma-4-E2B-32x-1B"  # the suite's folder in the repo
LAYER_MODULE = "language_model.layers.{layer}"  # an SAE's folder: the module it reads
LAYER = 17
MODEL = "google/gemma-4-E2B"
CTX = 64  # tokens per row
SAVE_DIR = Path("latents")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the"
    " engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    "def mean(values):\n    return sum(values) / len(values)\n\nprint(mean([1, 2, 3]))\n",
    "Photosynthesis converts light energy into chemical energy: plants take in carbon dioxide"
    " and water and release oxygen, storing the energy in sugars.",
]

# delphi loads `<folder>/<hookpoint>` for each hookpoint of a local folder; given the repo id
# instead, it loads every subfolder of the repo as an SAE, which fails on the suite's folder
# (it also holds max_activations/ and other data). So download this layer and pass the folder.
hookpoint = LAYER_MODULE.format(layer=LAYER)
root = snapshot_download(REPO, allow_patterns=[f"{PREFIX}/{hookpoint}/*"])
sae_dir = str(Path(root) / PREFIX)

tokenizer = AutoTokenizer.from_pretrained(MODEL)
dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
model = AutoModel.from_pretrained(MODEL, dtype=dtype).to(DEVICE).eval()
hooks, transcode = load_sparsify_hooks(model, sae_dir, hookpoints=[hookpoint])
for encode in hooks.values():
    encode.keywords["sae"].to(DEVICE)  # delphi 0.1.3 leaves SAEs from a folder on the CPU

# [rows, CTX] token ids: BOS, then CTX - 1 tokens of running text (documents joined by EOS),
# the shape of the rows the SAEs were trained on. Replace TEXTS with your corpus.
text = tokenizer("".join(t + tokenizer.eos_token for t in TEXTS), add_special_tokens=False)
rows = len(text.input_ids) // (CTX - 1)
body = torch.tensor(text.input_ids[: rows * (CTX - 1)]).view(rows, CTX - 1)
tokens = torch.cat([torch.full((rows, 1), tokenizer.bos_token_id), body], dim=1)

# delphi keeps every nonzero activation in memory (~64 bytes each, k per token), BOS included,
# and skips the rows past the last whole batch.
cache = LatentCache(model, hooks, batch_size=min(8, len(tokens)), transcode=transcode)
cache.run(n_tokens=tokens.numel(), tokens=tokens)
locations = cache.cache.latent_locations[hookpoint]  # [nonzeros, 3]: row, position, latent
activations = cache.cache.latent_activations[hookpoint]  # [nonzeros]
print(f"{len(activations)} activations over {tokens.numel()} tokens")

# On disk in delphi's layout, for delphi.latents.LatentDataset and its explainers.
SAVE_DIR.mkdir(parents=True, exist_ok=True)
cache.save_splits(n_splits=1, save_dir=SAVE_DIR)
cache.save_config(SAVE_DIR, CacheConfig(cache_ctx_len=CTX, n_tokens=tokens.numel()), MODEL)
