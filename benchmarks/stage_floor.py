"""Floors: the least work a stage could do on a batch, timed alone on the same tokens: the
model forward through the layers a layer needs, and the SAE's dense encoder matmul. Every
stage measurement also times its own floor, in its process right after the stage (the
peak memory is read first), so the two see the same machine load."""

from __future__ import annotations

import torch
from torch import nn

from loupe.model import capture, hidden_size, load_text_model, resolve_device
from loupe.settings import hookpoint
from loupe.tokens import open_split
from loupe.train import ShuffledRows

from .timing import median, peak_rss_mb, time_runs


def first_batch(settings: dict, tokens_path: str, rows: int, shuffled: bool) -> torch.Tensor:
    """The rows a stage sees first: [rows, ctx_len]. Training reads the rows in its seeded
    order (shuffled), sampling in file order."""
    tokens = open_split(tokens_path)
    if not shuffled:
        return torch.from_numpy(tokens[:rows].astype("int64"))
    data = ShuffledRows(tokens, settings["train"].get("shuffle_seed", 0))
    return torch.stack([data[i]["input_ids"] for i in range(rows)])


def num_latents(sae: dict, d_in: int) -> int:
    return sae.get("num_latents") or d_in * sae["expansion_factor"]


def measure(
    settings: dict, tokens: str, rows: int, prefixes: list[int], runs: int, shuffled: bool = True
) -> dict:
    """Forward seconds per batch through each number of layers in `prefixes`, and encoder
    matmul seconds on the same batch; medians of `runs` after one warm-up."""
    device = resolve_device(settings["device"])
    model = load_text_model(settings["model"]["name"], device)
    ids = first_batch(settings, tokens, rows, shuffled).to(device)
    parent_name = hookpoint(settings, 0).rpartition(".")[0]
    layers = list(model.base_model.get_submodule(parent_name))
    forward = {}
    for keep in sorted(set(prefixes)):
        model.base_model.set_submodule(parent_name, nn.ModuleList(layers[:keep]))
        point = hookpoint(settings, keep - 1)
        times = time_runs(lambda p=point: capture(model, p, ids), runs, device=device)
        forward[str(keep)] = {"seconds": median(times), "runs_s": times}

    d_in = hidden_size(model)
    acts = capture(model, hookpoint(settings, 0), ids).float().flatten(0, 1)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(num_latents(settings["sae"], d_in), d_in, generator=gen, device=device)
    bias = torch.zeros(weight.shape[0], device=device)
    with torch.inference_mode():
        times = time_runs(lambda: nn.functional.linear(acts, weight, bias), runs, device=device)
    return {
        "tokens": ids.numel(),
        "forward": forward,
        "encode": {"seconds": median(times), "runs_s": times, "num_latents": weight.shape[0]},
    }


def run(spec: dict) -> dict:
    """The floors at every prefix length, in a process of their own."""
    s = spec["settings"]
    if resolve_device(s["device"]).type == "cpu":
        torch.set_num_threads(max(1, spec["threads"]))
    out = measure(s, spec["tokens"], spec["rows"], spec["prefixes"], spec["runs"])
    out["peak_rss_mb"] = peak_rss_mb()
    return out
