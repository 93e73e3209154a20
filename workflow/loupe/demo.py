"""The embedded offline demo: an English corpus harvested from Python's own standard
library, and a tiny randomly initialised Gemma 4 model with a tokenizer trained on it."""

from __future__ import annotations

import ast
import gzip
import io
import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir, atomic_path
from .config import Config
from .progress import progress

log = logging.getLogger(__name__)

# Gemma's special ids, so the demo exercises the same BOS/EOS/PAD handling as the real model.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

_MIN_CHARS = 80  # shorter docstrings are mostly signatures, not prose
_SKIP_TOP = {"site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo"}


def _comment_paragraphs(source: str) -> Iterator[str]:
    """Runs of `#` comment lines joined into one paragraph each."""
    para: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            para.append(stripped.lstrip("#").strip())
            continue
        if para:
            yield " ".join(p for p in para if p)
            para = []
    if para:
        yield " ".join(p for p in para if p)


def _is_prose(text: str) -> bool:
    # Keep text that reads like sentences: mostly letters and spaces, and long enough.
    if len(text) < _MIN_CHARS:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.8


def harvest_documents(stdlib: Path | None = None) -> Iterator[dict]:
    """English prose from the standard library: the reference-manual topics, docstrings and
    comment paragraphs, in a fixed order (files sorted by path), so the corpus is the same on
    every run of the same Python."""
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield {"text": pydoc_data.topics.topics[name], "source": f"pydoc_data.topics:{name}"}

    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately broken test fixtures
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and _is_prose(doc):
                    yield {"text": doc, "source": f"{rel}:{getattr(node, 'name', '<module>')}"}
        for para in _comment_paragraphs(source):
            if _is_prose(para):
                yield {"text": para, "source": f"{rel}:#"}


def write_corpus(out: Path, min_bytes: int, stdlib: Path | None = None) -> dict:
    """Write the demo corpus as one gzipped JSON-lines file (byte-identical across runs)."""
    count = size = 0
    with atomic_path(out) as tmp:
        # mtime=0 and no file name in the gzip header keep the bytes deterministic.
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
        ):
            text = io.TextIOWrapper(gz, encoding="utf-8")
            for doc in harvest_documents(stdlib):
                line = json.dumps(doc, ensure_ascii=False)
                text.write(line + "\n")
                count += 1
                size += len(doc["text"].encode())
            text.flush()
            text.detach()
        if size < min_bytes:
            from .errors import LoupeError

            raise LoupeError(
                f"demo corpus: harvested only {size:,} bytes of prose, need {min_bytes:,}"
            )
    log.info("demo corpus: %d documents, %.1f MB of text -> %s", count, size / 1e6, out)
    return {"documents": count, "bytes": size}


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the demo model: the real Gemma 4 layout (sliding and full attention, shared KV,
    per-layer inputs), shrunk to run on a laptop CPU in seconds."""

    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 6
    num_kv_shared_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    global_head_dim: int = 64
    hidden_size_per_layer_input: int = 16
    sliding_window: int = 32
    max_position_embeddings: int = 4096
    full_attention_every: int = 3
    seed: int = 0
    # A short language-model warm-up, so next-token metrics (delta CE, KL) respond to what
    # a layer carries; a purely random model predicts ~uniformly whatever its layers hold.
    pretrain_steps: int = 60
    pretrain_batch: int = 4
    pretrain_ctx: int = 64
    pretrain_lr: float = 1e-2

    def layer_types(self) -> list[str]:
        every = self.full_attention_every
        return [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention"
            for i in range(self.num_hidden_layers)
        ]


def _texts(corpus: Path) -> Iterator[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(corpus: Path, vocab_size: int, specials: list[str] = SPECIALS):
    """A byte-level BPE tokenizer trained on the corpus, with Gemma's special ids (and any
    `specials` after them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # ids 0..3 in this order: pad, eos, bos, unk
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(corpus), trainer=trainer)
    assert [tok.token_to_id(s) for s in specials[:3]] == [PAD_ID, EOS_ID, BOS_ID]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1 << 20,
    )


def tiny_gemma4_config(spec: TinyModelSpec):
    from transformers import Gemma4Config

    # TinyModelSpec's fields are Gemma4TextConfig's own names.
    same = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_kv_shared_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "global_head_dim",
        "hidden_size_per_layer_input",
        "sliding_window",
        "max_position_embeddings",
    )
    text = {name: getattr(spec, name) for name in same} | dict(
        vocab_size_per_layer_input=spec.vocab_size,
        layer_types=spec.layer_types(),
        final_logit_softcapping=30.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


def pretrain(
    model, tokenizer, corpus: Path, spec: TinyModelSpec, texts: Iterable[str] | None = None
) -> list[float]:
    """A few AdamW steps of next-token training on the corpus (or on `texts`, if given);
    returns the losses."""
    import torch

    need = spec.pretrain_steps * spec.pretrain_batch * (spec.pretrain_ctx - 1)
    stream: list[int] = []
    for text in _texts(corpus) if texts is None else texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + [EOS_ID]
        if len(stream) >= need:
            break
    body = torch.tensor(stream[:need]).view(spec.pretrain_steps, spec.pretrain_batch, -1)
    bos = torch.full((spec.pretrain_steps, spec.pretrain_batch, 1), BOS_ID)
    batches = torch.cat([bos, body], dim=-1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr)
    model.train()
    losses = []
    for ids in progress(iterable=batches, desc="pretrain demo model", unit="step"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def build_tiny_model(out_dir: Path, corpus: Path, spec: TinyModelSpec) -> None:
    """Save the tiny Gemma 4 model (random, then briefly pretrained) and its tokenizer like
    a hub checkpoint."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    model = Gemma4ForConditionalGeneration(tiny_gemma4_config(spec))
    losses = pretrain(model, tokenizer, corpus, spec) if spec.pretrain_steps else []
    with atomic_dir(out_dir) as tmp:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    log.info("demo model: %s parameters, layers %s -> %s", f"{n:,}", spec.layer_types(), out_dir)
    if losses:
        log.info(
            "demo model pretrained %d steps: loss %.3f -> %.3f", len(losses), losses[0], losses[-1]
        )


# The second model: the tiny model after this many more steps on the corpus's last documents
# (pretraining read its first ones), as an instruction-tuned model is its base after more
# training on other text. Enough that the SAEs' metrics on it differ measurably.
TRANSFER_STEPS = 30


def build_transfer_model(base: Path, corpus: Path, out_dir: Path, steps: int = TRANSFER_STEPS):
    """Save the tiny model at `base` after `steps` more AdamW steps on other text (the
    corpus read from its end), with the same tokenizer; returns the losses."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    torch.manual_seed(TinyModelSpec.seed + 1)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = Gemma4ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    spec = dataclasses.replace(TinyModelSpec(), pretrain_steps=steps)
    losses = pretrain(model, tokenizer, corpus, spec, texts=reversed(list(_texts(corpus))))
    with atomic_dir(out_dir) as tmp:
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info(
        "demo transfer model: %d more steps (loss %.3f -> %.3f) -> %s",
        steps,
        losses[0],
        losses[-1],
        out_dir,
    )
    return losses


def build_corpus(config: Config, corpus: Path) -> dict:
    """The demo_corpus rule's job: at least demo.min_corpus_bytes of text in `corpus`."""
    return write_corpus(Path(corpus), config.demo.min_corpus_bytes)


def build_model(config: Config, corpus: Path, model: Path) -> None:
    """The demo_model rule's job: the tiny Gemma 4 model and tokenizer, trained on `corpus`."""
    build_tiny_model(Path(model), Path(corpus), TinyModelSpec())


def build_transfer(config: Config, corpus: Path, model: Path, transfer_model: Path) -> None:
    """The demo_transfer_model rule's job: the demo's second model from `model`."""
    build_transfer_model(Path(model), Path(corpus), Path(transfer_model))


# The demo's explainer: a tiny chat model (a 2-layer Llama of 51k parameters) with a byte-level
# tokenizer trained on the corpus and a chat template written here, served by the explain
# stage's embedded `transformers serve` offline on a CPU. Its weights are wired, not trained:
# whatever the prompt, it answers EXPLAINER_ANSWER, which delphi's parsers read both as an
# explanation and as a scorer's five predictions, so the demo runs every step (explanations,
# scores, card, plot) on real HTTP answers. Its explanations and scores are noise: the same
# sentence for every feature, and fixed predictions against shuffled labels (chance).
EXPLAINER_VOCAB = 512
EXPLAINER_ANSWER = (
    "[1, 0, ", "true, false", ", 1]", "\n[EXPLANATION]: ", "noise of the demo's wired explainer",
)  # fmt: skip
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_explainer(out_dir: Path, corpus: Path, seed: int = 0) -> None:
    """Save the wired chat model and its tokenizer (with CHAT_TEMPLATE) like a hub checkpoint.

    Its attention and MLP outputs are zeroed, so the last position's residual is its token's
    embedding: <|assistant|> and each piece of the answer (one added token each) embed as a
    basis vector whose logit row points at the next piece, the last at EOS. Greedy decoding
    after the chat template's <|assistant|> therefore writes the answer and stops."""
    import torch
    from tokenizers import AddedToken
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(
        corpus, EXPLAINER_VOCAB, SPECIALS + ["<|system|>", "<|user|>", "<|assistant|>"]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece in EXPLAINER_ANSWER])
    chain = [tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", *EXPLAINER_ANSWER)]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1 << 16,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.normal_(0, 0.02)
        for i, (token, following) in enumerate(zip(chain, [*chain[1:], EOS_ID], strict=True)):
            embed[token] = 0.0
            embed[token, i] = 1.0
            head[following] = 0.0
            head[following, i] = 50.0
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    log.info("demo explainer: a wired %s-parameter chat model -> %s", f"{n:,}", out_dir)


def build_explainer(config: Config, corpus: Path, explainer_model: Path) -> None:
    """The demo_explainer_model rule's job: the tiny chat model the demo's explain serves."""
    build_tiny_explainer(Path(explainer_model), Path(corpus))
