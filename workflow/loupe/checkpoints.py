"""The checkpoint folder of a training group: what made a checkpoint (its run identity), and the
moves that set one aside or swap one in without ever losing it.

The checkpoint folder (results/checkpoints/layer_N, N the group's shallowest layer: not a rule
output, so it survives a killed job) holds:

    state/               the checkpoint: sparsify's files (one folder per hookpoint), plus
                         loupe_run.json (what made it) and, in each hookpoint's folder,
                         recorder_state.json (the metrics' running sums) and
                         train_metrics.jsonl (every line up to it)
    <hookpoint>/train_metrics.jsonl   this run's log of that SAE, restored from state/ on resume
    summary.json         the last finished run's numbers
    .other/              the previous checkpoint, made with other settings (see below)
    .unreadable/         the last checkpoint that could not be read

A checkpoint is resumed only if its loupe_run.json equals this run's: the output-changing train
settings (`config.settings_for("train")`), the group's layers and the sha256 of the token
split's content (from tokenize's manifest). No path or file size enters it: moving or copying
the project keeps every checkpoint, and tokens re-made with other settings (same size, other
content) never resume a checkpoint trained on the old ones. The layers enter it because one
checkpoint holds the whole group: a checkpoint of another grouping is set aside, never mixed
into this one (regrouping restarts the groups that are not finished).

Nothing is deleted before the new run has checked its settings (`check_train_settings`, at job
start, before the folder is touched). A checkpoint of other settings is then moved to .other/,
with one log line naming what changed, and deleted when the new run writes its first
checkpoint; changing the settings back before then resumes it (the two swap places). One slot,
not one per settings: a checkpoint holds the SAEs and their optimizer state, GBs per layer at
the flagship's size. A checkpoint with a file that cannot be read (each is read once before the
resume, so the line can name it) is moved to .unreadable/ with one warning line, and training
starts over.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

# In the checkpoint folder. STATE is sparsify's run name: its checkpoint folder.
STATE = "state"
OTHER = ".other"
UNREADABLE = ".unreadable"
_SWAP = ".swap"  # the current checkpoint while it trades places with .other
# In each checkpoint, beside sparsify's files.
RUN_RECORD = "loupe_run.json"
RECORDER_STATE = "recorder_state.json"


# --- what makes a checkpoint's result ---------------------------------------------------------


def run_identity(config: Config, layers: list[int], split: str, manifest: dict) -> dict:
    """What a checkpoint must match to be resumed: everything that changes the trained SAEs,
    and which SAEs it holds. `split` is the token split's name in the manifest ("train")."""
    return {
        "layers": sorted(layers),
        "settings": config.settings_for("train"),
        "train_tokens_sha256": manifest["sha256"][split],
    }


def _flat(record: dict) -> dict:
    """A run record as dotted keys ("sae.k", "layers"), settings without their prefix."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, "" if name == "settings" else f"{name}.")
            else:
                out[name] = value

    walk(record, "")
    return out


def describe_change(old: dict | None, new: dict) -> str:
    """Why a checkpoint with record `old` is not this run's: 'settings changed: sae.k 8 -> 4'."""
    if old is None:
        return "it has no record of the settings it was made with"
    a, b = _flat(old), _flat(new)

    def show(key, value):
        if key.endswith("sha256") and isinstance(value, str):
            return value[:12]
        return value if isinstance(value, str) else json.dumps(value)

    diffs = [
        f"{k} {show(k, a.get(k))} -> {show(k, b.get(k))}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "settings changed: " + "; ".join(diffs[:3]) + more


# --- the checkpoint folder --------------------------------------------------------------------


def swap_in(new: Path, final: Path) -> None:
    """Replace folder `final` by `new`; at every instant one complete copy exists."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _trade_places(current: Path, other: Path) -> None:
    """Swap checkpoint folders `current` (may be absent) and `other` by renames; a kill in
    between is finished by _finish_interrupted_moves."""
    parked = current.with_name(_SWAP)
    if current.exists():
        os.replace(current, parked)
    os.replace(other, current)
    if parked.exists():
        os.replace(parked, other)


def _finish_interrupted_moves(checkpoint_dir: Path) -> None:
    """Complete what a kill interrupted, so that no checkpoint is ever lost to one."""
    state, other, parked = (checkpoint_dir / n for n in (STATE, OTHER, _SWAP))
    if parked.exists():  # _trade_places: the checkpoint that was current is parked
        if not state.exists():
            os.replace(other, state)
        os.replace(parked, other)
    old = checkpoint_dir / f".{STATE}.old"  # swap_in: the previous checkpoint is `.state.old`
    if old.exists() and not state.exists():
        os.replace(old, state)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(checkpoint_dir / f".{STATE}.tmp", ignore_errors=True)  # a torn save


def _record_of(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None


def prepare_checkpoint_dir(checkpoint_dir: Path, identity: dict) -> bool:
    """True if checkpoint_dir/state is now a checkpoint of this run (resume it). A checkpoint
    of other settings is moved to .other/, never deleted here (see the module docstring)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_moves(checkpoint_dir)
    state, other = checkpoint_dir / STATE, checkpoint_dir / OTHER
    current = _record_of(state) if state.exists() else None
    if state.exists() and current == identity:
        return True
    if other.exists() and _record_of(other) == identity:
        log.info(
            "resuming checkpoint %s, set aside when the settings changed: they are back to its"
            " own%s",
            other,
            f"; {state} is set aside in its place" if state.exists() else "",
        )
        _trade_places(state, other)
        return True
    if state.exists():
        log.warning(
            "setting checkpoint %s aside as %s (%s); it is resumed if they change back before"
            " this run writes its first checkpoint",
            state,
            other,
            describe_change(current, identity),
        )
        shutil.rmtree(other, ignore_errors=True)
        os.replace(state, other)
    return False


class UnreadableCheckpoint(Exception):
    """A checkpoint file is missing, truncated or corrupt (the message says which)."""


def why_unreadable(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""  # torch's: long
    # torch's unpickling errors advise weights_only=False, which would run any code the file
    # holds: never relay that advice about a file that is corrupt.
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in first:
        first = "not a file torch.save wrote"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
