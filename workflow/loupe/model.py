"""Loading the language model once per job: device choice, text tower only, frozen, and cut
after the hooked layer so nothing past it (later layers, the 262k-vocab LM head) is computed."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .errors import LoupeError

log = logging.getLogger(__name__)

# Non-text towers of multimodal checkpoints (Gemma 4): dropped, never computed or kept.
_NON_TEXT_MODULES = (
    "vision_tower",
    "audio_tower",
    "embed_vision",
    "embed_audio",
    "multi_modal_projector",
)


def resolve_device(name: str) -> torch.device:
    """`auto` picks the GPU if one is present; asking for `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoupeError(
                f"device {name!r} requested but no CUDA GPU is available (use device: auto or cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoupeError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) present")
    return device


def import_sparsify():
    """Import sparsify; without a GPU its Triton decoder cannot run, so use the eager one."""
    if not torch.cuda.is_available():
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    import sparsify

    return sparsify


def model_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPU (never fp16: Gemma 4's layer-0 MLP overflows it); fp32 on CPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_text_model(name: str, device: torch.device, revision: str | None = None):
    """The base model (no LM head) from a hub id or folder, text tower only, frozen, eval mode."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(name, revision=revision, dtype=model_dtype(device))
    except Exception as e:
        raise LoupeError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    for attr in _NON_TEXT_MODULES:
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, None)
    for cfg in {
        id(model.config): model.config,
        id(text_config(model)): text_config(model),
    }.values():
        cfg.use_cache = False  # a KV cache is pure overhead for single full-sequence passes
    model.requires_grad_(False)
    return model.eval().to(device)


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
        model(input_ids=input_ids.to(model.device))
    finally:
        handle.remove()
    return seen[0]
