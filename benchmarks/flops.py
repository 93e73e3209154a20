"""Per-token FLOPs of the real Gemma 4 E2B text tower, counted by torch's FlopCounterMode on
meta tensors (no weights, no memory), and of the SAE at its real width."""

from __future__ import annotations

from dataclasses import dataclass

# google/gemma-4-E2B's text config (see shared/notes/gemma4.md; MLP width 6144, doubled to
# 12288 in the 20 KV-shared layers, as in the published config.json and gemma.cpp's E2B).
E2B_TEXT = dict(
    vocab_size=262144,
    vocab_size_per_layer_input=262144,
    hidden_size=1536,
    intermediate_size=6144,
    num_hidden_layers=35,
    num_kv_shared_layers=20,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    global_head_dim=512,
    hidden_size_per_layer_input=256,
    sliding_window=512,
    layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(35)],
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
)


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token: `base` (before the first layer), one entry per layer, and the
    LM head (only evaluation computes logits)."""

    ctx_len: int
    base: float
    layers: list[float]
    lm_head: float
    params: int = 0  # parameters of the text tower (embeddings included)

    def prefix(self, layer: int) -> float:
        """Forward FLOPs per token up to and including `layer` (a truncated forward)."""
        return self.base + sum(self.layers[: layer + 1])

    @property
    def full(self) -> float:
        return self.prefix(len(self.layers) - 1)


def attended_positions(ctx_len: int, window: int | None) -> float:
    """Mean number of keys a query attends to in a causal row of ctx_len (sliding: window)."""
    limit = ctx_len if window is None else window
    return sum(min(t + 1, limit) for t in range(ctx_len)) / ctx_len


def count_e2b_flops(ctx_len: int = 1024, text: dict | None = None) -> ModelFlops:
    """Count the forward of the E2B text tower on meta tensors. The counter sees attention as
    dense [ctx, ctx] products; they are replaced by the causal (or sliding-window) count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Gemma4TextConfig, Gemma4TextModel

    text = dict(E2B_TEXT if text is None else text)
    cfg = Gemma4TextConfig(**text)
    with torch.device("meta"):
        model = Gemma4TextModel(cfg).eval()
    ids = torch.zeros(1, ctx_len, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False, depth=3)
    # Precomputed (absent) masks: building them reads tensor values, which meta cannot.
    masks = {"full_attention": None, "sliding_attention": None}
    with torch.no_grad(), counter:
        model(input_ids=ids, attention_mask=masks, use_cache=False)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    layers = []
    for i, kind in enumerate(text["layer_types"]):
        ops = {str(op): n for op, n in counts[f"{root}.layers.{i}"].items()}
        dense_attention = ops.pop("aten.bmm", 0)  # q@k^T and p@v over all ctx x ctx pairs
        full = kind == "full_attention"
        head_dim = text["global_head_dim"] if full else text["head_dim"]
        window = None if full else text["sliding_window"]
        heads = text["num_attention_heads"]
        assert dense_attention == 4 * heads * head_dim * ctx_len**2, (i, dense_attention)
        attention = 4 * heads * head_dim * attended_positions(ctx_len, window)
        layers.append(sum(ops.values()) / ctx_len + attention)
    total = sum(counts["Global"].values()) / ctx_len
    dense_layers = sum(sum(counts[f"{root}.layers.{i}"].values()) for i in range(len(layers)))
    base = total - dense_layers / ctx_len
    params = sum(p.numel() for p in model.parameters())
    return ModelFlops(
        ctx_len, base, layers, lm_head=2.0 * text["hidden_size"] * text["vocab_size"], params=params
    )


@dataclass(frozen=True)
class SaeFlops:
    """Per-token FLOPs of a TopK SAE: the dense encoder matmul and the sparse decoder."""

    d_in: int
    num_latents: int
    k: int
    multi_topk: bool

    @property
    def encode(self) -> float:
        return 2.0 * self.d_in * self.num_latents

    @property
    def forward(self) -> float:
        # Encoder, top-k selection (about one comparison per latent), sparse decoder; with
        # multi_topk training also decodes the top 4k.
        decode = 2.0 * self.k * self.d_in * (1 + 4 * self.multi_topk)
        return self.encode + self.num_latents + decode

    @property
    def train(self) -> float:
        """Forward plus backward, about 3x the forward for the SAE's own parameters."""
        return 3.0 * self.forward


def real_sae(d_in: int = 1536, expansion: int = 32, k: int = 100, multi_topk=True) -> SaeFlops:
    return SaeFlops(d_in, d_in * expansion, k, multi_topk)
