"""FLOPs per token of the real Gemma 4 E2B text tower (counted by torch's FlopCounterMode on
meta tensors: no weights, no memory) and of the SAE at its real width, and the GPU-hours of a
full build projected from them and the factors bench.py measures.

A stage's GPU time per token is modelled as forward_flops / R_model + saes * b * encode_flops /
R_sae: the model forward at its floor (the forward inside a stage is the floor's own
computation) plus, per SAE, `b` times the encoder matmul, b measured by bench.py. The training
floor is the whole suite on one forward: one pass through all layers and every SAE's step."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loupe.config import runs_of

# google/gemma-4-E2B's text config: MLP width 6144, doubled to 12288 in the 20 KV-shared
# layers (`use_double_wide_mlp`, as in the published config.json and gemma.cpp's E2B).
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

# Sustained TFLOP/s assumed for one H100 SXM, about 30% of its dense peaks. The model runs in
# bf16 (989 peak). So does the SAE's one dense matmul: sparsify runs SparseCoder.forward under
# bf16 autocast on CUDA, and its encoder's backward and its decoder are sparse (index_add,
# embedding_bag), counted in the measured b. Top logits run in fp32 on CUDA cores (67 peak).
RATES = {"model": 300.0, "sae": 300.0, "fp32": 20.0}
GPU_GB, WORK_GB = 80.0, 8.0  # an H100's memory; working set assumed beside model and SAEs


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
    with torch.device("meta"):
        model = Gemma4TextModel(Gemma4TextConfig(**text)).eval()
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
        heads = text["num_attention_heads"]
        assert dense_attention == 4 * heads * head_dim * ctx_len**2, (i, dense_attention)
        window = None if full else text["sliding_window"]
        layers.append(
            sum(ops.values()) / ctx_len + 4 * heads * head_dim * attended_positions(ctx_len, window)
        )
    dense_layers = sum(sum(counts[f"{root}.layers.{i}"].values()) for i in range(len(layers)))
    base = (sum(counts["Global"].values()) - dense_layers) / ctx_len
    params = sum(p.numel() for p in model.parameters())
    return ModelFlops(ctx_len, base, layers, 2.0 * text["hidden_size"] * text["vocab_size"], params)


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
        return self.encode + self.num_latents + 2.0 * self.k * self.d_in * (1 + 4 * self.multi_topk)

    @property
    def train(self) -> float:
        """Forward plus backward, about 3x the forward for the SAE's own parameters."""
        return 3.0 * self.forward


def real_sae(d_in: int = 1536, expansion: int = 32, k: int = 100, multi_topk=True) -> SaeFlops:
    return SaeFlops(d_in, d_in * expansion, k, multi_topk)


@dataclass(frozen=True)
class Build:
    """What a full build processes (gemma-loupe: 35 layers x 1B tokens, 10M sampled)."""

    layers: int = 35
    train_tokens: float = 1e9
    sample_tokens: float = 1e7
    eval_tokens: float = 1048576


def seconds_per_token(forward: float, saes: int, b: float, sae: SaeFlops, rates: dict) -> float:
    """GPU seconds per token of `forward` model FLOPs plus `saes` SAEs of b encoder matmuls."""
    return forward / (rates["model"] * 1e12) + saes * b * sae.encode / (rates["sae"] * 1e12)


def train_hours(model, sae, b, build, rates, group_size=1, truncate=True) -> float:
    """GPU-hours to train every layer: one job per run of `group_size` layers, grouped as
    loupe groups them (runs_of), each job's forward cut after its deepest layer (or the whole
    model with truncate=False). group_size = all layers is the floor: one forward."""
    total = 0.0
    for group in runs_of(list(range(build.layers)), group_size):
        forward = model.prefix(group[-1]) if truncate else model.full
        total += seconds_per_token(forward, len(group), b, sae, rates)
    return total * build.train_tokens / 3600


def sample_hours(model, sae, b, build, rates) -> float:
    """GPU-hours of max-activation sampling, one job per layer on a truncated forward."""
    per_token = sum(
        seconds_per_token(model.prefix(i), 1, b, sae, rates) for i in range(build.layers)
    )
    return per_token * build.sample_tokens / 3600


def eval_hours(model, sae, b, build, rates, passes: int = 3) -> float:
    """GPU-hours of evaluation: per layer and token, `passes` full forwards with logits
    (clean, SAE-spliced, zero-ablated) plus the SAE's measured share."""
    forward = passes * (model.full + model.lm_head)
    return build.layers * seconds_per_token(forward, 1, b, sae, rates) * build.eval_tokens / 3600


def largest_group(gpu_gb: float, model_gb: float, per_sae_gb: float, work_gb: float) -> int:
    """Most SAEs one job can train at once within gpu_gb."""
    return max(0, int((gpu_gb - model_gb - work_gb) // per_sae_gb))


# Training plans projected: the README's layers_per_job table (GPU memory 24, 40, 48, 80 GB).
GROUP_SIZES = (5, 12, 16, 18)
PER_LAYER = "one layer per job, truncated forward (loupe's default)"
FLOOR = "all layers in one job: the floor (one forward)"


def project(
    b: dict,
    per_sae_gb: float,
    tokenize_tokens_per_s: float,
    logits_flops_per_s: float,
    rates=RATES,
) -> dict:
    """GPU-hours of the full build per stage and training plan, from the measured SAE factors
    `b` (keys: alone, group = training one SAE per job or several on one forward; optimizer =
    the optimizer step per token, added to both; sample; eval), on the counted E2B FLOPs at ctx
    1024; each plan's training against the per-layer plan and against the floor."""
    model, sae, build = count_e2b_flops(1024), real_sae(), Build()
    model_gb = model.params * 2 / 1e9  # bf16 weights
    biggest = largest_group(GPU_GB, model_gb, per_sae_gb, WORK_GB) if per_sae_gb > 0 else 0
    alone, group = b["alone"] + b["optimizer"], b["group"] + b["optimizer"]
    plans = {
        PER_LAYER: dict(b=alone),
        "one layer per job, full forward (sparsify used plainly)": dict(b=alone, truncate=False),
        **{f"groups of {g} layers per job": dict(b=group, group_size=g) for g in GROUP_SIZES},
        FLOOR: dict(b=group, group_size=build.layers),
    }
    train = {k: train_hours(model, sae, build=build, rates=rates, **v) for k, v in plans.items()}
    sample = sample_hours(model, sae, b["sample"], build, rates)
    evaluate = eval_hours(model, sae, b["eval"], build, rates)
    full = seconds_per_token(model.full, 1, alone, sae, rates)
    truncation = {
        layer: full / seconds_per_token(model.prefix(layer), 1, alone, sae, rates)
        for layer in (0, build.layers // 2, build.layers - 1)
    }
    logits_flops = sae.num_latents * model.lm_head  # W_dec [F, d] @ W_U.T [d, vocab]
    tokens = build.train_tokens + build.sample_tokens + build.eval_tokens
    return {
        "rates_tflops": dict(rates),
        "build": asdict(build),
        "b": dict(b),
        "train_gpu_hours": train,
        "train_x_per_layer": {k: v / train[PER_LAYER] for k, v in train.items()},
        "train_x_floor": {k: v / train[FLOOR] for k, v in train.items()},
        "sample_gpu_hours": sample,
        "eval_gpu_hours": evaluate,
        "total_gpu_hours": {k: v + sample + evaluate for k, v in train.items()},
        "truncation_speedup": truncation,
        "memory_gb": {"model": model_gb, "per_sae_train": per_sae_gb, "gpu": GPU_GB},
        "largest_group": biggest,
        "tokenize_cpu_hours": tokens / tokenize_tokens_per_s / 3600,
        "logits_tflop_per_layer": logits_flops / 1e12,
        "logits_gpu_seconds_per_layer": logits_flops / (rates["fp32"] * 1e12),
        "logits_cpu_hours_per_layer": logits_flops / logits_flops_per_s / 3600,
        "forward_gflops_per_token": {
            "full": model.full / 1e9,
            "layer_17_prefix": model.prefix(17) / 1e9,
            "lm_head": model.lm_head / 1e9,
        },
        "sae_mflops_per_token": {"encode": sae.encode / 1e6, "train_3x": sae.train / 1e6},
    }
