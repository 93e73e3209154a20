"""loupe: one sparse autoencoder per decoder layer, built by a Snakemake workflow."""

__version__ = "0.1.0"
