"""Loading the language model and the SAEs, once per job: device choice, text tower only,
frozen, and cut after the hooked layer so nothing past it (later layers, the 262k-vocab LM head)
is computed."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import LoupeError
from .gpus import select_device
from .layout import SAE_CFG, SAE_WEIGHTS

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

# Non-text towers of multimodal checkpoints (Gemma 4): dropped, never computed or kept.
_NON_TEXT_MODULES = (
    "vision_tower",
    "audio_tower",
    "embed_vision",
    "embed_audio",
    "multi_modal_projector",
)


# The sparsify releases loupe's Trainer patches (trainer.py) were written and tested against:
# they override its checkpoint and resume internals, which change between releases.
SPARSIFY_SUPPORTED = ("1.3.3",)


def import_sparsify():
    """Import sparsify, checking its version; without a GPU its Triton decoder cannot run, so
    use the eager one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("eai-sparsify")
    except PackageNotFoundError:
        raise LoupeError(
            f"eai-sparsify is not installed (pip install eai-sparsify=={SPARSIFY_SUPPORTED[-1]})"
        ) from None
    if installed not in SPARSIFY_SUPPORTED:
        raise LoupeError(
            f"eai-sparsify {installed} is installed, but loupe's training patches are tested with"
            f" {', '.join(SPARSIFY_SUPPORTED)} only (pip install eai-sparsify=={SPARSIFY_SUPPORTED[-1]})"
        )
    if not torch.cuda.is_available():
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    import sparsify

    return sparsify


def model_dtype(device: torch.device, choice: str) -> torch.dtype:
    """The model's dtype (config model.dtype): auto = bf16 on GPU, fp32 on CPU. Never fp16:
    Gemma 4's layer-0 MLP overflows it."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


def load_model(
    name: str,
    device: torch.device,
    revision: str | None,
    dtype: str,
    head: bool = False,
):
    """The model from a hub id or folder, text tower only, frozen, eval mode: the base model
    (no LM head), or with `head` the causal LM (Gemma 4: Gemma4ForConditionalGeneration)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .tokens import check_name

    check_name("model.name", name)
    cls = AutoModelForCausalLM if head else AutoModel
    try:
        model = cls.from_pretrained(name, revision=revision, dtype=model_dtype(device, dtype))
    except Exception as e:
        raise LoupeError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    for owner in {id(model): model, id(model.base_model): model.base_model}.values():
        for attr in _NON_TEXT_MODULES:
            if isinstance(getattr(owner, attr, None), nn.Module):
                setattr(owner, attr, None)
    for cfg in {
        id(model.config): model.config,
        id(text_config(model)): text_config(model),
    }.values():
        cfg.use_cache = False  # a KV cache is pure overhead for single full-sequence passes
    if head and model.get_output_embeddings() is None:
        raise LoupeError(f"model {name!r} has no LM head: cannot compute next-token loss")
    model.requires_grad_(False)
    return model.eval().to(device)


def load_sae(path: Path, device: torch.device, decoder: bool = True):
    """A trained SAE from its folder (or its sae.safetensors), in fp32, frozen, eval mode."""
    sparsify = import_sparsify()
    folder = Path(path)
    folder = folder.parent if folder.name == SAE_WEIGHTS else folder
    if not (folder / SAE_CFG).is_file() or not (folder / SAE_WEIGHTS).is_file():
        raise LoupeError(f"no trained SAE in {folder} (needs {SAE_CFG} and {SAE_WEIGHTS})")
    try:
        sae = sparsify.SparseCoder.load_from_disk(folder, device=device, decoder=decoder)
    except Exception as e:
        raise LoupeError(f"cannot load SAE from {folder}: {type(e).__name__}: {e}") from e
    return sae.float().eval().requires_grad_(False)


@dataclass
class LayerJob:
    """What a per-layer step works with."""

    layer: int
    hookpoint: str
    device: torch.device
    model: nn.Module
    sae: nn.Module | None = None  # the trained SAE, when the step reads one
    special_ids: list[int] = field(default_factory=list)  # BOS/EOS/PAD of the token splits


def open_layer(
    config: Config,
    layer: int,
    threads: int = 1,
    *,
    head: bool = False,
    truncate: bool = True,
    sae: Path | None = None,
    decoder: bool = True,
    manifest: Path | None = None,
) -> LayerJob:
    """The preamble of train, maxact and evaluate: check the layer, pick the device and
    threads, load the SAE (if `sae`: its folder or sae.safetensors) and the model (with its LM
    head if `head`; cut after the layer if `truncate`: running the head needs every layer),
    check that the SAE reads this model's activations and that the token splits (their
    `manifest`) fit its vocabulary, and read the special token ids."""
    from .tokens import read_tokens_manifest, special_ids

    if layer not in config.model.layers:
        raise LoupeError(f"layer {layer} is not in model.layers {config.model.layers}")
    tokens = read_tokens_manifest(manifest) if manifest is not None else {}
    special = special_ids(tokens)
    # Before the model loads, so a job waiting for a free GPU holds no memory.
    device = select_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads))
    trained = load_sae(sae, device, decoder) if sae is not None else None
    hookpoint = config.model.hookpoint_of(layer)
    model_config = config.model
    model = load_model(
        model_config.name, device, model_config.revision, model_config.dtype, head=head
    )
    if trained is not None and trained.d_in != hidden_size(model):
        raise LoupeError(
            f"the SAE in {Path(sae).parent if Path(sae).is_file() else sae} reads"
            f" {trained.d_in}-dim activations, but {model_config.name} has hidden size {hidden_size(model)}:"
            " it was trained on another model"
        )
    top, vocab = tokens.get("max_token_id"), model.get_input_embeddings().num_embeddings
    if top is not None and top >= vocab:
        raise LoupeError(
            f"the token splits hold token id {top}, but {model_config.name} has {vocab} embeddings:"
            " they were tokenized for another model (check model.tokenizer)"
        )
    if truncate:
        kept = truncate_after(model, hookpoint)
    else:
        get_hookpoint(model, hookpoint)  # one clear line before any work
        kept = -1
    log.info(
        "layer %d: hookpoint %s on %s (%s), %s",
        layer,
        hookpoint,
        device,
        str(model_dtype(device, model_config.dtype)).removeprefix("torch."),
        "all layers" if kept < 0 else f"{kept} decoder layers",
    )
    return LayerJob(layer, hookpoint, device, model, trained, special)


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def hidden_size(model) -> int:
    return text_config(model).hidden_size


def get_hookpoint(model, hookpoint: str) -> nn.Module:
    """The module named `hookpoint` relative to the base model (sparsify's convention)."""
    try:
        return model.base_model.get_submodule(hookpoint)
    except AttributeError:
        parent = hookpoint.rsplit(".", 1)[0]
        raise LoupeError(
            f"hookpoint {hookpoint!r} not found in {type(model).__name__}"
            f" (check model.hookpoint and model.layers; {parent!r} has "
            f"{_child_count(model, parent)} children)"
        ) from None


def _child_count(model, path: str) -> str:
    try:
        return str(len(list(model.base_model.get_submodule(path).children())))
    except AttributeError:
        return "no"


def truncate_after(model, hookpoint: str) -> int:
    """Drop every decoder layer after the hooked one; returns how many layers remain.

    A prefix of the layers computes identical activations (causal stack; Gemma 4's shared-KV
    layers only read earlier layers), so layer L needs layers 0..L and nothing else."""
    get_hookpoint(model, hookpoint)
    parent_name, _, index = hookpoint.rpartition(".")
    parent = model.base_model.get_submodule(parent_name) if parent_name else None
    if not isinstance(parent, nn.ModuleList) or not index.isdigit():
        log.warning(
            "hookpoint %s is not an item of a layer list: running the full model", hookpoint
        )
        return -1
    keep = int(index) + 1
    model.base_model.set_submodule(parent_name, nn.ModuleList(list(parent)[:keep]))
    return keep


@torch.inference_mode()
def capture(model, hookpoint: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Output of `hookpoint` for a batch: [batch, seq, d] in the model's dtype."""
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = get_hookpoint(model, hookpoint).register_forward_hook(hook)
    try:
        # The base model, never the LM head a causal LM would run on top: at Gemma 4's
        # 262,144-token vocabulary its logits cost 2.5-8x the sampling pass's time and GBs of
        # memory (issue 26), and activations need none of them.
        model.base_model(input_ids=input_ids.to(model.device))
    finally:
        handle.remove()
    return seen[0]
