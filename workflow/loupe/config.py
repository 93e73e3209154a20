"""The configuration: validated against the schema (the only place a default is written), then
built once into one frozen dataclass per section. Field names are the config keys, which are
sparsify's names where the setting is sparsify's.

Every key is classified in the schema: `x-affects-output: false` marks execution-only keys
(device, batch sizes, logging, checkpoint cadence), which may change between runs without
changing any result. `STAGE_READS` names the output-changing keys each stage reads; only those
reach a rule's `params:`, so Snakemake reruns a stage exactly when one of its results would
change.

This module imports no torch: the Snakefile imports it to validate the config at start."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import LoupeError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
AFFECTS_OUTPUT = "x-affects-output"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    revision: str
    tokenizer: str | None
    hookpoint: str
    layers: list[int]
    dtype: str

    def hookpoint_of(self, layer: int) -> str:
        return self.hookpoint.format(layer=layer)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.name


@dataclass(frozen=True)
class RedPajamaConfig:
    """RedPajama v2 documents named the way its publishers do (loupe.redpajama)."""

    snapshots: list[str]
    language: str
    partition: str
    shard_start: int
    shard_count: int
    open_files: int
    base_url: str  # or a local folder holding the same layout
    missing_list_url: str | None  # None: read no list

    def tags(self) -> list[str]:
        """The publisher's base tags, '{snapshot}/{shard:04d}/{language}_{part}', in its order."""
        from .redpajama import PARTITIONS

        shards = range(self.shard_start, self.shard_start + self.shard_count)
        return [
            f"{snap}/{n:04d}/{self.language}_{part}"
            for snap in self.snapshots
            for n in shards
            for part in PARTITIONS[self.partition]
        ]

    def url(self, tag: str) -> str:
        return f"{self.base_url.rstrip('/')}/documents/{tag}.json.gz"


@dataclass(frozen=True)
class DatasetConfig:
    path: str | None
    redpajama: RedPajamaConfig | None = field(metadata={"section": RedPajamaConfig})
    data_files: list[str] | None
    name: str | None
    split: str
    text_column: str
    description: str
    hub_id: str | None


@dataclass(frozen=True)
class TokensConfig:
    ctx_len: int
    train_tokens: int
    sample_tokens: int
    eval_tokens: int
    seed: int
    shuffle_buffer: int
    doc_batch_size: int

    def rows(self) -> dict[str, int]:
        """Rows per split: whole rows, rounded up so each split has at least its tokens."""
        want = {"train": self.train_tokens, "sample": self.sample_tokens, "eval": self.eval_tokens}
        return {s: -(-n // self.ctx_len) for s, n in want.items()}


@dataclass(frozen=True)
class SaeConfig:
    """sparsify's SparseCoderConfig, field for field."""

    activation: str
    expansion_factor: int
    num_latents: int
    k: int
    multi_topk: bool
    normalize_decoder: bool
    skip_connection: bool


@dataclass(frozen=True)
class TrainConfig:
    """sparsify's TrainConfig fields, plus loupe's own (log_every, shuffle_seed, and the
    grouping of layers into jobs)."""

    batch_size: int
    grad_acc_steps: int
    micro_acc_steps: int
    optimizer: str
    lr: float
    lr_warmup_steps: int
    auxk_alpha: float
    dead_feature_threshold: int
    exclude_tokens: list[int]
    init_seeds: list[int]
    save_every: int
    log_every: int
    log_to_wandb: bool
    shuffle_seed: int
    layers_per_job: int
    layer_groups: list[list[int]] | None

    # The fields sparsify's TrainConfig takes; the rest are loupe's.
    SPARSIFY_FIELDS = (
        "batch_size",
        "grad_acc_steps",
        "micro_acc_steps",
        "optimizer",
        "lr",
        "lr_warmup_steps",
        "auxk_alpha",
        "dead_feature_threshold",
        "exclude_tokens",
        "init_seeds",
        "save_every",
        "log_to_wandb",
    )

    def sparsify_kwargs(self) -> dict:
        return {k: getattr(self, k) for k in self.SPARSIFY_FIELDS}


@dataclass(frozen=True)
class MaxactConfig:
    top_n: int
    window_before: int
    window_after: int
    intervals: int
    per_interval: int
    top_logits: int
    batch_size: int
    random_windows: int

    @property
    def width(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass(frozen=True)
class ExplainConfig:
    """Feature explanations by an explainer LLM, scored with delphi's detection and fuzzing
    (loupe.explain)."""

    base_url: str | None
    model: str
    api_key_env: str | None
    features: int | str
    score_features: int
    scorers: list[str]
    explain_examples: int
    score_examples: int
    examples_per_prompt: int
    max_tokens: int
    concurrency: int
    timeout: float
    retries: int


@dataclass(frozen=True)
class NeighboursConfig:
    """Each feature's nearest features by decoder cosine (loupe.neighbours)."""

    top_n: int
    chunk: int


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    max_tokens: int
    logit_chunk: int
    dense_threshold: float
    k_ladder: list[int]
    transfer_models: list[str]
    spliced_max_tokens: int


@dataclass(frozen=True)
class HubConfig:
    repo: str
    prefix: str
    revision: str
    private: bool
    license: str
    language: str
    authors: str | None
    space: str | None
    saelens: bool
    neuronpedia_model: str | None
    neuronpedia_set: str | None


@dataclass(frozen=True)
class DemoConfig:
    corpus: str
    model: str
    min_corpus_bytes: int
    transfer_model: str | None
    explainer_model: str | None


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    device: str
    dataset: DatasetConfig
    tokens: TokensConfig
    sae: SaeConfig
    train: TrainConfig
    maxact: MaxactConfig
    evaluate: EvaluateConfig
    hub: HubConfig
    neighbours: NeighboursConfig
    demo: DemoConfig | None = None
    explain: ExplainConfig | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        """Validate `raw` (a copy gets the schema's defaults) and build the typed config."""
        data = validate(copy.deepcopy(raw))
        built = {}
        for f in fields(cls):
            section = SECTIONS.get(f.name)
            value = data.get(f.name)
            built[f.name] = _build(section, value) if section and value is not None else value
        return cls(**built)

    def to_dict(self) -> dict:
        """The config as the plain dict it was built from (an absent demo stays absent)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def settings_for(self, stage: str) -> dict:
        """The output-changing keys `stage` reads (what its rule's params carry)."""
        return stage_settings(self.to_dict(), stage)

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoupeError(f"--config is not valid JSON: {e}") from None
        return cls.from_dict(raw)


def _build(cls, values: dict):
    """A section's dataclass from its validated dict, nested sections included."""
    kwargs = dict(values)
    for f in fields(cls):
        nested = f.metadata.get("section")
        if nested and kwargs.get(f.name) is not None:
            kwargs[f.name] = _build(nested, kwargs[f.name])
    return cls(**kwargs)


SECTIONS = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "tokens": TokensConfig,
    "sae": SaeConfig,
    "train": TrainConfig,
    "maxact": MaxactConfig,
    "evaluate": EvaluateConfig,
    "hub": HubConfig,
    "neighbours": NeighboursConfig,
    "demo": DemoConfig,
    "explain": ExplainConfig,
}

# The output-changing keys each stage reads ("section" = all of its output-changing keys,
# "section.key" = one key). A stage reads its other inputs (tokens, SAE, stats) as files,
# which Snakemake tracks itself. model.layers is read only by the stages that cover every
# layer: adding a layer must not retrain the others.
STAGE_READS: dict[str, tuple[str, ...]] = {
    "demo_corpus": ("demo.min_corpus_bytes",),
    "demo_model": (),
    "demo_transfer_model": (),
    "demo_explainer_model": (),
    "tokenize": (
        "model.name",
        "model.revision",
        "model.tokenizer",
        "dataset.path",
        "dataset.redpajama",
        "dataset.data_files",
        "dataset.name",
        "dataset.split",
        "dataset.text_column",
        "tokens",
    ),
    "train": ("model.name", "model.revision", "model.hookpoint", "model.dtype", "sae", "train"),
    "maxact": (
        "model.name",
        "model.revision",
        "model.tokenizer",
        "model.hookpoint",
        "model.dtype",
        "maxact",
    ),
    "explain": ("model.name", "maxact", "explain"),
    "neighbours": ("neighbours",),
    "evaluate": (
        "model.name",
        "model.revision",
        "model.hookpoint",
        "model.dtype",
        "evaluate.max_tokens",
        "evaluate.dense_threshold",
        "evaluate.k_ladder",
        "evaluate.transfer_models",
    ),
    "spliced": (
        "model.name",
        "model.revision",
        "model.hookpoint",
        "model.dtype",
        "model.layers",
        "evaluate.spliced_max_tokens",
    ),
    "summary": ("model.name", "model.layers"),
    "flow": ("model.name", "model.layers"),
    # The layers its rows are labelled with; the explainer's name titles its plot.
    "explanation_scores": ("model.layers", "explain.model"),
    "stage": (
        "model",
        "dataset",
        "tokens",
        "sae",
        "train",
        "maxact",
        "evaluate",
        "neighbours",
        "hub.repo",
        "hub.prefix",
        "hub.license",
        "hub.language",
        "hub.authors",
        "hub.space",
        "hub.saelens",
        "hub.neuronpedia_model",
        "hub.neuronpedia_set",
    ),
    "neuronpedia": (
        "model.name",
        "model.layers",
        "model.hookpoint",
        "dataset.path",
        "dataset.hub_id",
        "tokens.ctx_len",
        "tokens.sample_tokens",
        "hub.repo",
        "hub.prefix",
        "hub.authors",
        "hub.saelens",
        "hub.neuronpedia_model",
        "hub.neuronpedia_set",
    ),
    "upload": ("hub.repo", "hub.revision", "hub.space"),
}


def check_train_settings(
    config: Config, d_in: int | None = None, rows: int | None = None, vocab: int | None = None
) -> None:
    """One LoupeError line for a value the schema accepts but sparsify cannot train with.

    Needs no model and no torch: at workflow start, call it with the config alone (the split's
    rows follow from `tokens`); train_group calls it again with the hookpoint's width `d_in`,
    the split's `rows` and the model's `vocab`, before it touches the checkpoint folder."""
    sae, train = config.sae, config.train
    rows = config.tokens.rows()["train"] if rows is None else rows
    if rows < train.batch_size:
        raise LoupeError(
            f"train.batch_size {train.batch_size} exceeds the {rows} rows of the training split"
        )
    batches = rows // train.batch_size
    if batches < train.grad_acc_steps:
        raise LoupeError(
            f"train.grad_acc_steps {train.grad_acc_steps} exceeds the {batches} batches of the"
            f" training split (train.batch_size {train.batch_size}): no optimizer step would run"
        )
    latents = sae.num_latents or (d_in * sae.expansion_factor if d_in else 0)
    if latents:  # with num_latents 0 the count needs the hookpoint's width
        made_of = (
            "sae.num_latents"
            if sae.num_latents
            else f"{d_in} inputs x sae.expansion_factor {sae.expansion_factor}"
        )
        # sparsify's encoder takes the top k latents, its Multi-TopK loss the top 4k, and
        # groupmax splits the latents into k equal groups: each fails inside torch otherwise.
        if sae.k > latents:
            raise LoupeError(f"sae.k {sae.k} exceeds the SAE's {latents} latents ({made_of})")
        if sae.multi_topk and 4 * sae.k > latents:
            raise LoupeError(
                f"sae.multi_topk needs 4 x sae.k = {4 * sae.k} latents, but the SAE has"
                f" {latents} ({made_of}): lower sae.k or turn multi_topk off"
            )
        if sae.activation == "groupmax" and latents % sae.k:
            raise LoupeError(
                f"sae.activation groupmax needs sae.k {sae.k} to divide the SAE's {latents}"
                f" latents ({made_of})"
            )
    if vocab is not None and (outside := [t for t in train.exclude_tokens if t >= vocab]):
        raise LoupeError(f"train.exclude_tokens {outside} outside the vocabulary ({vocab} ids)")


def check_yaml(path: str | Path) -> dict:
    """A config file's settings, or one line naming the file and the line of a YAML mistake in
    it (Snakemake's own message names neither)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise LoupeError(f"config file {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LoupeError(f"config file {path}{where} is not valid YAML: {what}") from None
    if data is not None and not isinstance(data, dict):
        raise LoupeError(f"config file {path} holds a {type(data).__name__}, not settings")
    return data or {}


def overlay(base: dict, over: dict) -> dict:
    """`over` layered onto `base` as Snakemake layers config files: section by section."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = overlay(out[key], value) if both else value
    return out


def check_config(configfile: list[Path]) -> None:
    """`python -m loupe check-config --configfile A.yaml B.yaml`: the files a run would be
    given with `--configfile`, checked before spending anything. Snakemake parses those files
    before any workflow code runs, so for a YAML mistake in one it says only "Config file is
    not valid JSON or YAML"; this names the file, line and column, then layers the files over
    config.yaml as Snakemake does and checks the result against the schema."""
    data = check_yaml("config.yaml")
    for path in configfile:
        data = overlay(data, check_yaml(path))
    Config.from_dict(validate(data))
    print(f"config OK: config.yaml + {' + '.join(map(str, configfile))}")


# --- the schema -------------------------------------------------------------------------------


def load_schema() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA_PATH.read_text())


def schema_keys(schema: dict | None = None) -> dict[str, bool]:
    """Every leaf key as a dotted path ("sae.k", "device", "dataset.redpajama.shard_count") ->
    whether it affects outputs (a nested section's keys inherit its annotation)."""

    def walk(node: dict, prefix: str, affects: bool) -> dict[str, bool]:
        affects = affects and node.get(AFFECTS_OUTPUT, True)
        children = node.get("properties")
        if not children:
            return {prefix: affects}
        out = {}
        for key, sub in children.items():
            out |= walk(sub, f"{prefix}.{key}" if prefix else key, affects)
        return out

    return walk(schema or load_schema(), "", True)


def _validator(schema: dict):
    """A jsonschema validator that fills defaults as it descends (the jsonschema FAQ's way),
    so a section's default ({}) is filled with its keys' defaults too."""
    from jsonschema import Draft202012Validator, validators

    properties = Draft202012Validator.VALIDATORS["properties"]

    def fill_defaults(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from properties(validator, props, instance, schema)

    cls = validators.extend(Draft202012Validator, {"properties": fill_defaults})
    return cls(schema)


def validate(data: dict, schema: dict | None = None) -> dict:
    """Fill the schema's defaults into `data` and check it; one line naming the key on error."""
    schema = schema or load_schema()
    error = next(iter(_validator(schema).iter_errors(data)), None)
    if error is None:
        dataset = data.get("dataset") or {}
        if (dataset.get("path") is None) == (dataset.get("redpajama") is None):
            raise LoupeError("config error at dataset: give exactly one of path and redpajama")
        if rp := dataset.get("redpajama"):
            from .redpajama import check_choice

            check_choice(rp["snapshots"], rp["shard_start"], rp["shard_count"])
        for key in ("repo", "space"):
            if name := (data.get("hub") or {}).get(key):
                _check_repo_id(f"hub/{key}", name)
        return data
    key = "/".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        unknown = sorted(set(error.instance) - set(known))
        raise LoupeError(
            f"config error: unknown key {'/'.join(filter(None, [key, unknown[0]]))}"
            f" (known keys here: {', '.join(known)})"
        )
    raise LoupeError(f"config error at {key or '(top level)'}: {error.message}")


def _check_repo_id(key: str, name: str) -> None:
    """The Hub's own rules for a repo id (characters, length, no `--`), checked at start: else
    the staged card names a repo that the upload, hours later, cannot create."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise LoupeError(f"config error at {key}: {e}") from None


def stage_settings(data: dict, stage: str, schema: dict | None = None) -> dict:
    """The output-changing keys `stage` reads, from a validated config dict: its params."""
    out: dict[str, Any] = {}
    for dotted, affects in schema_keys(schema).items():
        if affects and any(dotted == r or dotted.startswith(f"{r}.") for r in STAGE_READS[stage]):
            *parents, key = dotted.split(".")
            source, target = data, out
            for p in parents:
                source = source.get(p) if isinstance(source, dict) else None
                target = target.setdefault(p, {})
            target[key] = source.get(key) if isinstance(source, dict) else None
    return out


def runs_of(layers: list[int], n: int) -> list[list[int]]:
    """Sorted `layers` in runs of n, filled from the deepest layer up: the one smaller run (if
    any) is the shallowest, whose forward is the cheapest. [0..34] by 12: 0-10, 11-22, 23-34."""
    layers = sorted(layers)
    return [layers[max(0, end - n) : end] for end in range(len(layers), 0, -n)][::-1]


def layer_groups(config: Config) -> list[list[int]]:
    """The layers each training job trains together on one shared forward pass, each group in
    depth order: train.layer_groups when given (it overrides layers_per_job, which the
    reference config sets), else model.layers in runs of train.layers_per_job
    (runs_of). One LoupeError line if a layer is in no group or in two."""
    train, layers = config.train, sorted(config.model.layers)
    where = "config error at train/layer_groups"
    if train.layer_groups is None:
        return runs_of(layers, train.layers_per_job)
    group_of: dict[int, list[int]] = {}
    for group in train.layer_groups:
        for layer in group:
            if layer not in layers:
                raise LoupeError(f"{where}: layer {layer} is not in model.layers {layers}")
            if layer in group_of:
                raise LoupeError(
                    f"{where}: layer {layer} is in two groups, {group_of[layer]} and {group}"
                )
            group_of[layer] = group
    if missing := [layer for layer in layers if layer not in group_of]:
        raise LoupeError(
            f"{where}: model.layers {missing} are in no group (every layer must be in one)"
        )
    return [sorted(group) for group in train.layer_groups]
