"""The shapes benchmarked: the offline demo's, and the real SAE width (d_in 1536, 32x, k 100)
on a short random model of the Gemma 4 architecture at E2B's hidden size."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from loupe.demo import TinyModelSpec

REPO = Path(__file__).resolve().parents[1]
HOOKPOINT = "language_model.layers.{layer}"


@dataclass(frozen=True)
class Shape:
    """One benchmarked configuration: a random model, the SAE settings and the batch shape."""

    name: str
    model: TinyModelSpec
    config: str  # which settings the SAE and trainer take: "real" (config.yaml) or "demo"
    batch_size: int = 1  # rows per batch (of fixtures.BENCH_CTX_LEN tokens)
    # 2, not the real 4: three optimizer steps after a warm-up step fit the time budget.
    grad_acc_steps: int = 2
    sae_overrides: dict = field(default_factory=dict)
    layers: tuple[int, ...] = ()  # (shallow, deep) layers measured

    def describe(self) -> dict:
        d = asdict(self)
        d["model"] = asdict(self.model)
        return d


# The real E2B head layout (8 query heads, 1 KV head, head_dim 256 / global 512, per-layer
# inputs 256, window 512, MLP 6144) cut to 4 layers and a 2048-token vocabulary so it fits a
# 2-core, 24 GB machine. Four layers cannot hold E2B's 5-layer attention period, so the last
# layer is the full-attention one; no layer shares KV (a shared layer needs a full-attention
# layer before it), hence none has E2B's double-wide MLP either.
E2B_WIDTH = Shape(
    name="e2b-width",
    model=TinyModelSpec(
        vocab_size=2048,
        hidden_size=1536,
        intermediate_size=6144,
        num_hidden_layers=4,
        num_kv_shared_layers=0,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        hidden_size_per_layer_input=256,
        sliding_window=512,
        full_attention_every=4,
    ),
    config="real",
    layers=(0, 2),
)

DEMO = Shape(name="demo", model=TinyModelSpec(), config="demo", batch_size=4, layers=(0, 4))

# --quick: the same code paths on shapes small enough to run in a minute or two.
QUICK_WIDE = replace(
    E2B_WIDTH,
    name="wide-quick",
    model=replace(
        E2B_WIDTH.model,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        full_attention_every=3,
        head_dim=32,
        global_head_dim=64,
        num_attention_heads=4,
        hidden_size_per_layer_input=16,
    ),
    sae_overrides={"expansion_factor": 8, "k": 32},
    layers=(0, 1),
)


def shapes(quick: bool) -> list[Shape]:
    """The shapes of a run, the one the cost model reads first."""
    return [QUICK_WIDE, DEMO] if quick else [E2B_WIDTH, DEMO]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def repo_config(which: str) -> dict:
    """config.yaml (the real gemma-loupe settings), with the demo overrides for `demo`."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    if which == "demo":
        cfg = _merge(cfg, yaml.safe_load((REPO / "profiles/demo/demo-config.yaml").read_text()))
    return cfg


def settings_for(shape: Shape, model_dir: Path, device: str) -> dict:
    """The settings JSON a train/maxact rule would pass, for this shape's model and batch."""
    cfg = repo_config(shape.config)
    train = dict(cfg["train"])
    train.update(
        batch_size=shape.batch_size,
        grad_acc_steps=shape.grad_acc_steps,
        save_every=10**9,  # no in-loop checkpoint: every run saves once, at the end
        log_every=1,
    )
    return {
        "model": {
            "name": str(model_dir),
            "revision": None,
            "tokenizer": None,
            "hookpoint": HOOKPOINT,
            "layers": list(range(shape.model.num_hidden_layers)),
        },
        "device": device,
        "sae": {**cfg["sae"], **shape.sae_overrides},
        "train": train,
        "maxact": dict(cfg.get("maxact") or {}),
    }
