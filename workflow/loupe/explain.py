"""Feature explanations: an explainer LLM names each feature from its top examples, with
delphi's explainer prompt, and delphi's detection and fuzzing scorers rate a sample of the
names on held-out examples (interval examples the explainer did not see, and random windows
where the feature is exactly inactive). Requests go to any OpenAI-compatible chat-completions
endpoint; every answered request is appended to a record, so a rerun sends only what was never
answered. A failed request or an unparseable answer is a row with its status, never a crash.

delphi's prompt modules are plain text and functions, vendored byte for byte in
assets/delphi (installing eai-delphi pulls in vLLM, which this stage does not need) and loaded
by file. Its highlighting (<<tokens>> above 0.3 x the example's maximum), its activation list
and its answer parsing are reproduced here line for line (delphi/explainers/explainer.py,
scorers/classifier/)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .config import Config, ExplainConfig
from .errors import LoupeError
from .progress import progress

log = logging.getLogger(__name__)

# Bump when loupe changes what it sends (example formatting, sampling of examples).
PROMPT_VERSION = "loupe-2"  # 2: held-out examples span the activations, top ones included
THRESHOLD = 0.3  # delphi's Explainer.threshold: highlight tokens above 0.3 x the max
SEED = 0
STATUSES = ("ok", "unparsed", "failed")


# The eai-delphi release whose prompt modules assets/delphi holds (tests check both).
DELPHI_VERSION = "0.1.3"
DELPHI_PROMPTS = Path(__file__).parent / "assets" / "delphi"


def _delphi_module(relative: str):
    """One of delphi's prompt modules (a path inside the delphi package), from loupe's copy."""
    path = DELPHI_PROMPTS / relative
    module_spec = importlib.util.spec_from_file_location(f"loupe_delphi_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Prompts and parsing (delphi's)


def highlight(tokens: list[str], acts: list[float], marked) -> str:
    """delphi's _highlight: runs of marked tokens between << and >>."""
    out, i = "", 0
    while i < len(tokens):
        if marked(i):
            out += "<<"
            while i < len(tokens) and marked(i):
                out += tokens[i]
                i += 1
            out += ">>"
        else:
            out += tokens[i]
            i += 1
    return out


def explainer_messages(examples: list[tuple[list[str], list[float]]]) -> list[dict]:
    """delphi's DefaultExplainer prompt (activations shown, no chain of thought) of examples
    (token strings, activations); activations normalised 0-10 by the feature's maximum."""
    prompts = _delphi_module("explainers/default/prompts.py")
    top = max((max(a) for _, a in examples), default=0.0) or 1.0
    lines = []
    for tokens, acts in examples:
        bar = max(acts) * THRESHOLD
        lines.append(highlight(tokens, acts, lambda i, a=acts, b=bar: a[i] > b))
        shown, pairs = 0, ""
        for tok, act in zip(tokens, acts, strict=True):
            if act > bar:
                if shown > 10:  # delphi shows at most 11 per example
                    break
                pairs += f'("{tok}" : {int(round(act / top * 10))}), '
                shown += 1
        lines.append("Activations: " + pairs)
    messages = prompts.system(cot=False)
    for n in range(1, 4):
        prompt, response = prompts.example(n, activations=True, cot=False)
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    messages.append({"role": "user", "content": "\n" + "\n".join(lines) + "\n"})
    return messages


def parse_explanation(text: str) -> str | None:
    match = re.search(r"\[EXPLANATION\]:\s*(.*)", text, re.DOTALL)
    return match.group(1).strip() if match else None


def scorer_messages(scorer: str, explanation: str, texts: list[str]) -> list[dict]:
    """delphi's detection or fuzzing prompt for one batch of example texts."""
    module = {"detection": "detection_prompt", "fuzzing": "fuzz_prompt"}[scorer]
    prompts = _delphi_module(f"scorers/classifier/prompts/{module}.py")
    examples = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    return prompts.prompt(examples=examples, explanation=explanation)


def parse_predictions(text: str, n: int) -> list[bool] | None:
    """delphi's Classifier._parse: the first [...] in the answer, as a JSON list of n."""
    match = re.search(r"\[.*?\]", text)
    try:
        values = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != n:
        return None
    return [bool(v) for v in values]


# ---------------------------------------------------------------------------------------------
# The client and the record of answers


class Endpoint:
    """An OpenAI-compatible /chat/completions endpoint, with the answers already paid for."""

    def __init__(self, explain_config: ExplainConfig, record: Path):
        if explain_config.base_url is None:
            raise LoupeError("explain.base_url is null: start the embedded server first")
        self.explain_config = explain_config
        self.url = explain_config.base_url.rstrip("/") + "/chat/completions"
        self.key = None
        if explain_config.api_key_env is not None:
            self.key = os.environ.get(explain_config.api_key_env)
            if not self.key:
                raise LoupeError(
                    f"explain.api_key_env names {explain_config.api_key_env}, which is unset"
                )
        self.record = Path(record)
        self.answers: dict[str, dict] = {}
        if self.record.exists():
            text = self.record.read_text()
            if text and not text.endswith("\n"):  # cut by a kill: end it, keep appending
                with open(self.record, "a") as f:
                    f.write("\n")
            for line in text.splitlines():
                try:  # a line cut by a kill is skipped: its request is sent again
                    entry = json.loads(line)
                    self.answers[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError):
                    continue
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.errors: dict[str, int] = {}

    def request_key(self, messages: list[dict]) -> str:
        body = json.dumps(
            [self.explain_config.model, self.explain_config.max_tokens, messages], sort_keys=True
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def ask(self, messages: list[dict]) -> dict | None:
        """{'text', 'prompt_tokens', 'completion_tokens'}, or None where the request failed
        after its retries (the error is counted, by kind)."""
        key = self.request_key(messages)
        if key in self.answers:
            return self.answers[key]
        body = {
            "model": self.explain_config.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.explain_config.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.explain_config.retries + 1):
            request = urllib.request.Request(
                self.url, json.dumps(body).encode(), headers, method="POST"
            )
            try:
                with urllib.request.urlopen(
                    request, timeout=self.explain_config.timeout
                ) as response:
                    reply = json.loads(response.read())
                break
            except urllib.error.HTTPError as e:
                kind, retry = f"HTTP {e.code}", e.code == 429 or e.code >= 500
            except (TimeoutError, urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                timeout = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                kind, retry = ("timeout", True) if timeout else (f"unreachable ({reason})", False)
            except json.JSONDecodeError:
                kind, retry = "not JSON", False
            if not retry or attempt == self.explain_config.retries:
                with self.lock:
                    self.errors[kind] = self.errors.get(kind, 0) + 1
                return None
            time.sleep(min(0.5 * 2**attempt, 30))
        usage = reply.get("usage") or {}
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            with self.lock:
                self.errors["malformed reply"] = self.errors.get("malformed reply", 0) + 1
            return None
        entry = {
            "key": key,
            "text": text,
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
        }
        with self.lock:  # one line per answer, flushed: a kill loses only requests in flight
            with open(self.record, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.answers[key] = entry
        return entry


# ---------------------------------------------------------------------------------------------
# Which features, which examples


def one_per_stratum(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions in a sorted list of `size` items: one drawn at random from each of n equal
    strata (all of them if n >= size), so the draw spans the whole range of the sort key."""
    if n >= size:
        return np.arange(size)
    edges = np.linspace(0, size, n + 1).astype(int)
    picks = [rng.integers(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return np.array(picks, dtype=np.int64)


def stratified(features: np.ndarray, density: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """n of `features` (all if fewer), one from each of n equal strata of features sorted by
    density: a sample spread over rare and common features. Sorted."""
    order = features[np.argsort(density, kind="stable")]
    return np.sort(order[one_per_stratum(len(order), n, np.random.default_rng(seed))])


def _examples(path: Path, features: np.ndarray) -> dict[int, list[tuple[list[str], list[float]]]]:
    import polars as pl

    df = (
        pl.read_parquet(
            path, columns=["feature", "activation", "context_tokens", "token_activations"]
        )
        .filter(pl.col("feature").is_in(features.tolist()))
        .sort(["feature", "activation"], descending=[False, True], maintain_order=True)
    )
    out: dict[int, list] = {}
    for f, tokens, acts in df.select("feature", "context_tokens", "token_activations").iter_rows():
        out.setdefault(f, []).append((json.loads(tokens), json.loads(acts)))
    return out


def _inactive_windows(path: Path, features: np.ndarray) -> dict[int, list[list[str]]]:
    """Per feature, the pooled random windows in which it fires on no token."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["context_tokens", "features", "activations"])
    texts = [json.loads(t) for t in table.column("context_tokens").to_pylist()]
    size = table.num_rows
    if size == 0:
        return {int(f): [] for f in features}
    codes = np.asarray(table.column("features").combine_chunks().flatten().flatten()).reshape(
        size, -1
    )
    acts = np.asarray(table.column("activations").combine_chunks().flatten().flatten()).reshape(
        size, -1
    )
    out = {}
    for f in features:
        fires = ((codes == f) & (acts > 0)).any(1)
        out[int(f)] = [texts[w] for w in np.nonzero(~fires)[0]]
    return out


def scoring_samples(
    scorer: str,
    active: list[tuple[list[str], list[float]]],
    inactive: list[list[str]],
    n: int,
    rng: np.random.Generator,
) -> list[tuple[str, bool]]:
    """(text, label) samples, shuffled. detection: n held-out activating examples (label 1)
    and n inactive windows (0), unmarked. fuzzing (delphi's FuzzingScorer): the activating
    examples with their tokens above the threshold marked (1), and the same examples with as
    many tokens below it marked instead (0). `active` is sorted by peak activation, highest
    first; the n drawn span it (one per stratum), as delphi draws its test examples from every
    activation quantile, so a score covers weak activations too, not only the strongest."""
    active = [active[i] for i in one_per_stratum(len(active), n, rng)]
    samples: list[tuple[str, bool]] = []
    if scorer == "detection":
        samples += [("".join(t), True) for t, _ in active]
        picks = rng.permutation(len(inactive))[:n]
        samples += [("".join(inactive[i]), False) for i in picks]
    else:
        for tokens, acts in active:
            bar = max(acts) * THRESHOLD
            above = [i for i, a in enumerate(acts) if a > bar]
            below = [i for i, a in enumerate(acts) if a <= bar]
            samples.append((highlight(tokens, acts, lambda i, a=acts, b=bar: a[i] > b), True))
            if below:
                wrong = set(rng.choice(below, size=min(len(above), len(below)), replace=False))
                samples.append((highlight(tokens, acts, lambda i, w=wrong: i in w), False))
    return [samples[i] for i in rng.permutation(len(samples))]


# ---------------------------------------------------------------------------------------------
# The stage


def _score(
    endpoint, explain_config, scorer, explanation, samples
) -> tuple[float | None, int, int, bool]:
    """Accuracy over the parsed predictions; (score, prompt tokens, completion tokens, failed)."""
    right = seen = ptok = ctok = 0
    failed = False
    per = explain_config.examples_per_prompt
    for start in range(0, len(samples), per):
        batch = samples[start : start + per]
        answer = endpoint.ask(scorer_messages(scorer, explanation, [t for t, _ in batch]))
        if answer is None:
            failed = True
            continue
        ptok += answer["prompt_tokens"]
        ctok += answer["completion_tokens"]
        predictions = parse_predictions(answer["text"], len(batch))
        if predictions is None:
            continue
        seen += len(batch)
        right += sum(p == label for p, (_, label) in zip(predictions, batch, strict=True))
    return (right / seen if seen else None), ptok, ctok, failed


def explain_feature(endpoint, explain_config, feature, shown, held_out, inactive, scored) -> dict:
    row = {
        "feature": int(feature),
        "explanation": None,
        "detection": None,
        "fuzzing": None,
        "explainer": explain_config.model,
        "n_examples": len(shown),
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "status": "failed",
    }
    answer = endpoint.ask(explainer_messages(shown))
    if answer is None:
        return row
    row["prompt_tokens"], row["completion_tokens"] = (
        answer["prompt_tokens"],
        answer["completion_tokens"],
    )
    row["explanation"] = parse_explanation(answer["text"])
    if row["explanation"] is None:
        row["status"] = "unparsed"
        return row
    row["status"] = "ok"
    if scored:
        rng = np.random.default_rng([SEED, int(feature)])
        for scorer in explain_config.scorers:
            samples = scoring_samples(
                scorer, held_out, inactive, explain_config.score_examples, rng
            )
            score, ptok, ctok, failed = _score(
                endpoint, explain_config, scorer, row["explanation"], samples
            )
            row[scorer] = score
            row["prompt_tokens"] += ptok
            row["completion_tokens"] += ctok
            if failed:
                row["status"] = "failed"
    return row


@dataclass
class Plan:
    """What a layer's run sends: the features explained and scored, and their examples."""

    chosen: np.ndarray
    scored: set[int]
    top: dict[int, list]
    spread: dict[int, list]
    inactive: dict[int, list[list[str]]]

    def shown(self, explain_config: ExplainConfig, f: int) -> list:
        return self.top.get(int(f), [])[: explain_config.explain_examples]

    def held_out(self, explain_config: ExplainConfig, f: int) -> list:
        """The activating examples the explainer was not shown: the top examples past those
        shown and the interval examples, by peak activation, highest first; a window shown,
        or held out twice, once at most."""
        seen = {json.dumps(t) for t, _ in self.shown(explain_config, f)}
        rest = self.top.get(int(f), [])[explain_config.explain_examples :] + self.spread.get(
            int(f), []
        )
        out = []
        for example in sorted(rest, key=lambda e: -max(e[1], default=0.0)):
            key = json.dumps(example[0])
            if key not in seen:
                seen.add(key)
                out.append(example)
        return out


def plan_layer(
    explain_config: ExplainConfig,
    examples: Path,
    intervals: Path,
    stats: Path,
    random_windows: Path,
) -> Plan:
    import polars as pl

    feature_stats = pl.read_parquet(stats, columns=["feature", "density", "examples"])
    live = feature_stats.filter(pl.col("examples") > 0)
    ids, density = live["feature"].to_numpy(), live["density"].to_numpy()
    chosen = (
        ids
        if explain_config.features == "all"
        else stratified(ids, density, int(explain_config.features))
    )
    scored = stratified(chosen, density[np.isin(ids, chosen)], explain_config.score_features)
    return Plan(
        chosen,
        set(scored.tolist()),
        _examples(examples, chosen),
        _examples(intervals, scored),
        _inactive_windows(random_windows, scored),
    )


def explain_layer(
    config: Config,
    layer: int,
    examples: Path,
    intervals: Path,
    stats: Path,
    random_windows: Path,
    record: Path,
    explanations: Path,
    server_log: Path | None = None,
) -> dict:
    """explanations.parquet of one layer: one row per explained feature. Exits with a
    LoupeError only where nothing could be answered at all. Where explain.base_url is null,
    the job serves explain.model itself (loupe.explain_server) on its device, its output
    in `server_log` (default: beside the record)."""
    inputs = (examples, intervals, stats, random_windows)
    if config.explain.base_url is not None:
        return _explain_layer(config.explain, layer, inputs, record, explanations)
    from .explain_server import embedded_server
    from .gpus import select_device

    device = str(select_device(config.device))
    server_log = server_log or Path(record).with_name("explain_server.log")
    with embedded_server(config.explain.model, device, server_log) as url:
        served = dataclasses.replace(config.explain, base_url=url)
        return _explain_layer(served, layer, inputs, record, explanations)


def _explain_layer(
    explain_config: ExplainConfig,
    layer: int,
    inputs: tuple[Path, ...],
    record: Path,
    explanations: Path,
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    endpoint = Endpoint(explain_config, record)
    plan = plan_layer(explain_config, *inputs)
    log.info(
        "layer %d: explaining %d features with %s at %s, scoring %d (%s)",
        layer, len(plan.chosen), explain_config.model, explain_config.base_url, len(plan.scored),
        ", ".join(explain_config.scorers),
    )  # fmt: skip

    def one(f: int) -> dict:
        return explain_feature(
            endpoint,
            explain_config,
            f,
            plan.shown(explain_config, f),
            plan.held_out(explain_config, f),
            plan.inactive.get(int(f), []),
            int(f) in plan.scored,
        )

    rows = []
    bar = progress(total=len(plan.chosen), desc=f"explain layer {layer}", unit="feature")
    with concurrent.futures.ThreadPoolExecutor(explain_config.concurrency) as pool:
        for row in pool.map(one, plan.chosen):
            rows.append(row)
            bar.update(1)
    bar.close()
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    if rows and counts["failed"] == len(rows) and endpoint.errors:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(endpoint.errors.items()))
        raise LoupeError(f"no request to {endpoint.url} was answered ({kinds})")
    table = pa.Table.from_pylist(
        [
            {**r, "layer": layer, "prompt_version": PROMPT_VERSION, "delphi": DELPHI_VERSION}
            for r in rows
        ],
        schema=explanations_schema(),
    )
    with atomic_path(Path(explanations)) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    if endpoint.errors:
        log.warning("failed requests: %s", endpoint.errors)
    log.info(
        "layer %d: %d features: %d ok, %d unparsed, %d failed",
        layer, len(rows), counts["ok"], counts["unparsed"], counts["failed"],
    )  # fmt: skip
    return counts


# ---------------------------------------------------------------------------------------------
# Cost, before spending

# Assumed answer lengths (tokens) where nothing was sent yet: an explanation line after a short
# reasoning, and a scorer's list of 0/1 for its batch.
EXPLANATION_TOKENS = 40
ASSUMED_EXPLANATION = "Mentions of a file path or module name in Python documentation text."


def count_tokens(tokenizer, messages: list[dict]) -> int:
    """Tokens of the messages' contents plus 4 per message for the chat template's markers."""
    return sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 4 for m in messages)


def shared_prefix(requests: list[list[dict]]) -> int:
    """How many leading messages every request shares (what a server's prefix cache keeps)."""
    if not requests:
        return 0
    n = 0
    while all(len(r) > n + 1 and r[n] == requests[0][n] for r in requests):
        n += 1
    return n


def dry_run_layer(explain_config: ExplainConfig, plan: Plan, tokenizer) -> dict:
    """The prompt and completion tokens a layer's run would send, from its real prompts
    (scorer prompts with ASSUMED_EXPLANATION in place of the answers not yet bought); and the
    prompt tokens outside the prefix every request of a kind shares (the uncached ones)."""
    explain_req, score_req = [], {s: [] for s in explain_config.scorers}
    completion = 0
    for f in plan.chosen:
        explain_req.append(explainer_messages(plan.shown(explain_config, f)))
        completion += EXPLANATION_TOKENS
        if int(f) not in plan.scored:
            continue
        rng = np.random.default_rng([SEED, int(f)])
        for scorer in explain_config.scorers:
            samples = scoring_samples(
                scorer, plan.held_out(explain_config, f), plan.inactive.get(int(f), []),
                explain_config.score_examples, rng,
            )  # fmt: skip
            for start in range(0, len(samples), explain_config.examples_per_prompt):
                batch = [t for t, _ in samples[start : start + explain_config.examples_per_prompt]]
                score_req[scorer].append(scorer_messages(scorer, ASSUMED_EXPLANATION, batch))
                completion += 2 * len(batch) + 2  # "[1,0,...]"
    prompt = uncached = 0
    for requests in (explain_req, *score_req.values()):
        if not requests:
            continue
        prefix = count_tokens(tokenizer, requests[0][: shared_prefix(requests)])
        for r in requests:
            total = count_tokens(tokenizer, r)
            prompt += total
            uncached += total - prefix
    requests = len(explain_req) + sum(len(r) for r in score_req.values())
    return {
        "features": len(plan.chosen),
        "scored": len(plan.scored),
        "requests": requests,
        "prompt_tokens": prompt,
        "uncached_prompt_tokens": uncached,
        "completion_tokens": completion,
    }


def explain_dry_run(
    config: Config,
    layers: list[int],
    examples: list[Path],
    intervals: list[Path],
    stats: list[Path],
    random_windows: list[Path],
) -> dict:
    """Print the tokens the configured run would send, per layer and in total; sends nothing.
    Tokens are counted with explain.model's tokenizer where it loads offline, else with the
    SAE model's (said in the output)."""
    from .tokens import load_tokenizer

    explain_config = config.explain
    try:
        tokenizer, counted_with = load_tokenizer(explain_config.model, None), explain_config.model
    except LoupeError:  # an explainer not in the local cache: the suite's own tokenizer
        name = config.model.tokenizer_name
        tokenizer, counted_with = load_tokenizer(name, config.model.revision), name
    rows = {}
    for layer, ex, iv, st, rw in zip(
        layers, examples, intervals, stats, random_windows, strict=True
    ):
        rows[layer] = dry_run_layer(
            explain_config, plan_layer(explain_config, ex, iv, st, rw), tokenizer
        )
    total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    columns = list(total)
    print(
        f"explain dry run: {explain_config.model}, tokens counted with {counted_with}'s tokenizer"
    )
    print("layer  " + "  ".join(f"{c:>22}" for c in columns))
    for layer, r in [*rows.items(), ("total", total)]:
        print(f"{layer!s:>5}  " + "  ".join(f"{r[c]:>22,}" for c in columns))
    return {"layers": rows, "total": total, "tokenizer": counted_with}


def explanations_schema():
    from .examples import schema

    return schema("""
        feature            int64    feature (latent) index
        explanation        string   the explainer's explanation (null unless status is ok)
        detection          float64  detection score: accuracy telling held-out activating
                                    windows from random inactive ones (0.5 is chance; null where
                                    not scored)
        fuzzing            float64  fuzzing score: accuracy telling the marked tokens the
                                    feature fires on from others (0.5 is chance; null where not
                                    scored)
        explainer          string   the explainer model
        n_examples         int64    top examples shown to the explainer
        prompt_tokens      int64    prompt tokens of the feature's requests
        completion_tokens  int64    completion tokens of the feature's requests
        status             string   ok; unparsed: the answer held no explanation; failed: a
                                    request failed
        layer              int64    decoder layer
        prompt_version     string   version of loupe's explainer prompt
        delphi             string   version of eai-delphi, whose prompt and scorers were used
    """)
