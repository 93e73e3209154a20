"""The model card's SAELens recipe: one published layer by repo id (sae-lens 6.54.12).

Card contract (as for quickstart.py): the `# %% saelens` cell is the card's code block (this
header is not shown), as is except for the values of the lines `REPO = ...` and `SAE_ID = ...`
(one assignment per line, starting at column 0, a trailing comment kept), which the card
renderer replaces with the suite's own: SAE_ID is the example layer's SAELens folder.
"""

# %% saelens
from sae_lens import SAE

REPO = "rhizomatous/gemma-loupe"
SAE_ID = "sae-gemma-4-E2B-32x-1B/saelens/language_model.layers.17"  # a layer's SAELens folder

sae = SAE.from_pretrained(release=REPO, sae_id=SAE_ID)
print(f"{sae.cfg.metadata.hook_name}: {sae.cfg.d_sae} latents, k = {sae.cfg.k}")
