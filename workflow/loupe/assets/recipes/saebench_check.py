"""The model card's SAEBench check: a layer loaded with SAELens against what SAEBench's custom-SAE
interface (sae_bench/custom_saes: BaseSAE and its README) asks of an SAE object.

Card contract (as for saelens_load.py): the `# %% saebench` cell is the card's code block, as is
except for the values of the lines `REPO = ...` and `SAE_ID = ...`.
"""

# %% saebench
import torch
from sae_lens import SAE

REPO = "rhizomatous/gemma-loupe"
SAE_ID = "sae-gemma-4-E2B-32x-1B/saelens/language_model.layers.17"  # a layer's SAELens folder

sae = SAE.from_pretrained(release=REPO, sae_id=SAE_ID)
d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
# Shapes: W_dec [d_sae, d_model], W_enc [d_model, d_sae] (BaseSAE.test_sae).
assert sae.W_dec.shape == (d_sae, d_in) and sae.W_enc.shape == (d_in, d_sae)
# dtype and device attributes, and the cfg fields the evals read.
assert sae.dtype == torch.float32 and sae.device.type == "cpu"
assert sae.cfg.metadata.model_name and sae.cfg.metadata.hook_name
# encode, decode and forward: forward(x) is decode(encode(x)).
x = torch.randn(8, d_in)
with torch.no_grad():
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-6)
# Decoder rows as BaseSAE.check_decoder_norms tests them: unit norm within 1e-5 in float32.
norms = sae.W_dec.detach().norm(dim=1)
unit = torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
print(f"interface ok; unit-norm decoder rows: {unit} ({norms.min():.3f} to {norms.max():.3f})")
