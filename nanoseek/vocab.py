"""Vocabulary extension for a new language: new BPE merges appended to a tokenizer, and the model surgery that
gives the new tokens embedding and output-head rows.

A base tokenizer cuts text of a language it never saw into many short pieces (Welsh through an English or code
vocabulary: often 2-3x the tokens per word), which costs context and compute and makes the model learn words
from fragments. `extend_tokenizer` learns N merges on the new language's text and appends them; every existing
token keeps its id and its string, special tokens included, so the base model's rows stay valid:
- the words of the new text are pre-tokenized and cut into pieces exactly as the base tokenizer does, then the
  most frequent adjacent pair is merged, N times (classic BPE continued from the base segmentation, rather than
  a fresh BPE whose merges might join pieces the base vocabulary cannot produce);
- a pair whose concatenation already is a token is not taken: reaching an existing token by a new route would
  change how base-domain text is cut, so every new merge makes a new token, and the base text's encoding only
  changes where a new token applies;
- new tokens take ids after the whole current vocabulary (added/special tokens included), merges are appended
  in learned order, so BPE applies all base merges first and then the new ones as learned.
Continuing from the base segmentation cut held-out Welsh to fewer tokens per word than keeping the representable
merges of a fresh BPE trained on the same text (the figures are in issue 13's notes).

`extend_model` resizes the embedding and output head to the extended vocabulary: old rows are kept bit for
bit, and each new token's row (embedding and head each from their own rows) is the mean of the rows of the
pieces the base tokenizer cuts its string into, the usual initialisation that starts the new token where the
model already "reads" that string. MTP shares the main embedding and head (`model/mtp.py`), so it follows.

`NewRowsOnly` is the first stage of `nanoseek adapt`: only the new rows train while the rest of the model is
frozen, so the new tokens catch up before full training moves everything else.

Legend: V vocabulary rows, D model width.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from typing import Iterable, Optional

import torch
from torch import nn

from tokenizers import Tokenizer as _Backend

from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer


# ---- tokenizer extension --------------------------------------------------------------------------------
def _words(backend: _Backend, documents: Iterable[str]) -> Counter:
    """Pre-tokenized words (in the model's alphabet, e.g. byte-level characters) and their counts."""
    counts: Counter = Counter()
    for doc in documents:
        if backend.normalizer is not None:
            doc = backend.normalizer.normalize_str(doc)
        pieces = backend.pre_tokenizer.pre_tokenize_str(doc) if backend.pre_tokenizer is not None else [(doc, None)]
        counts.update(w for w, _ in pieces)
    return counts


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(base: Tokenizer, documents: Iterable[str], n: int, min_count: int = 2) -> list[tuple[str, str]]:
    """Up to n merges (pairs of token strings) learnt on `documents` on top of the base tokenizer's
    segmentation, most frequent first; fewer when no pair of new text occurs min_count times."""
    backend = base.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    counts = _words(backend, documents)
    words: list[tuple[str, ...]] = []
    freq: list[int] = []
    for w, c in counts.items():
        pieces = tuple(t.value for t in backend.model.tokenize(w))
        if len(pieces) > 1:  # a word that is already one token has nothing to merge
            words.append(pieces)
            freq.append(c)
    pair_count: Counter = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freq[i]
            where[pair].add(i)
    # max-heap by count with lazy deletion: an entry is current only if its count still matches; ties go to
    # the smaller pair, so the result does not depend on hash order
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < n:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue
        if -neg < min_count:
            break
        a, b = pair
        if a + b in vocab:  # an existing token by a new route: not taken (see the module docstring)
            del pair_count[pair]
            continue
        merges.append(pair)
        vocab[a + b] = -1  # taken: later merges must not produce this string again
        changed: Counter = Counter()
        for i in where.pop(pair):
            old = words[i]
            new = _merge_word(old, a, b)
            if new == old:
                continue
            for p in zip(old, old[1:]):
                changed[p] -= freq[i]
            for p in zip(new, new[1:]):
                changed[p] += freq[i]
                where[p].add(i)
            words[i] = new
        pair_count.pop(pair, None)
        changed.pop(pair, None)
        for p, d in changed.items():
            if d:
                pair_count[p] += d
                heapq.heappush(heap, (-pair_count[p], p))
    return merges


def append_merges(base: Tokenizer, merges: list[tuple[str, str]]) -> Tokenizer:
    """The base tokenizer with `merges` appended (lowest priority, in order) and their tokens given the next
    ids after everything in the vocabulary, added tokens included."""
    spec = json.loads(base.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be extended, this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    next_id = 1 + max([*vocab.values(), *(a["id"] for a in spec.get("added_tokens", []))])
    added = {a["content"] for a in spec.get("added_tokens", [])}
    as_lists = not model["merges"] or isinstance(model["merges"][0], list)  # tokenizers >= 0.20 writes pairs
    for a, b in merges:
        for part in (a, b):
            if part not in vocab:
                raise ValueError(f"merge ({a!r}, {b!r}): {part!r} is not a token")
        if a + b in vocab or a + b in added:
            raise ValueError(f"merge ({a!r}, {b!r}): {a + b!r} is already a token")
        vocab[a + b] = next_id
        next_id += 1
        model["merges"].append([a, b] if as_lists else f"{a} {b}")
    backend = _Backend.from_str(json.dumps(spec, ensure_ascii=False))
    return Tokenizer(backend, base.bos_token, base.eos_token, base.pad_token, config=base.config)


def extend_tokenizer(base: Tokenizer, documents: Iterable[str], n: int) -> Tokenizer:
    """`base` plus up to n new tokens learnt on `documents` (see the module docstring)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError("the number of tokens to add must be a positive integer")
    return append_merges(base, learn_merges(base, documents, n))


def check_extends(base: Tokenizer, extended: Tokenizer) -> None:
    """Raise ValueError unless every id of `base` is the same token in `extended`."""
    if extended.vocab_size < base.vocab_size:
        raise ValueError(f"the tokenizer ({extended.vocab_size} tokens) is smaller than the base one "
                         f"({base.vocab_size})")
    for i in range(base.vocab_size):
        if base.id_to_token(i) != extended.id_to_token(i):
            raise ValueError(f"the tokenizer does not extend the base one: id {i} is {extended.id_to_token(i)!r} "
                             f"there, {base.id_to_token(i)!r} in the base")


# ---- model surgery --------------------------------------------------------------------------------------
@torch.no_grad()
def extend_model(model: Transformer, base: Tokenizer, extended: Tokenizer) -> range:
    """Resize `model` (in place) to `extended`'s vocabulary and initialise its new tokens' rows; returns the ids
    of the new tokens. The model has rows for `base` (perhaps more: a config may round the vocabulary up).

    Rows end up max(current rows, extended vocabulary): rows of the base tokens are kept bit for bit, rows of
    new tokens (appended, or padded rows they now occupy) are the mean of their base pieces' rows, and padded
    rows past the extended vocabulary stay as they were."""
    check_extends(base, extended)
    cfg = model.config
    if cfg.vocab_size < base.vocab_size:
        raise ValueError(f"the model has {cfg.vocab_size} vocabulary rows, fewer than its tokenizer's "
                         f"{base.vocab_size} tokens")
    new = range(base.vocab_size, extended.vocab_size)
    table = extended._table()
    pieces = [base.encode_bytes(table[i]) for i in new]
    resize_rows(model, max(cfg.vocab_size, extended.vocab_size))
    for w in {id(w): w for w in (model.embed_tokens.weight, model.lm_head.weight)}.values():  # [V, D], tied once
        for i, ids in zip(new, pieces):
            w[i] = w[ids].double().mean(0).to(w.dtype)
    return new


@torch.no_grad()
def resize_rows(model: Transformer, rows: int) -> None:
    """Grow the embedding and the output head (tied or not) to `rows` rows, in place: the old rows kept bit for
    bit, the added ones zero. The MTP modules share both, so they follow."""
    cfg = model.config
    if rows <= cfg.vocab_size:
        return
    emb, head = model.embed_tokens.weight, model.lm_head.weight
    dev, dt = emb.device, emb.dtype
    model.embed_tokens = nn.Embedding(rows, cfg.hidden_size, device=dev, dtype=dt)
    model.embed_tokens.weight.zero_()[:emb.shape[0]] = emb
    model.lm_head = nn.Linear(cfg.hidden_size, rows, bias=False, device=dev, dtype=dt)
    if head is emb:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight.zero_()[:head.shape[0]] = head
    model.config = cfg.replace(vocab_size=rows)


class NewRowsOnly:
    """Train only the embedding and head rows of the new tokens: on() freezes every other parameter and masks
    the embedding's and head's gradients to the new rows; off() restores what trained before.

    With zero gradients AdamW leaves a row exactly as it is (its moments stay zero) except for weight decay,
    which the caller turns off for the stage (the head is a decayed matrix)."""

    def __init__(self, model: Transformer, new_rows: range):
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.rows = new_rows
        self.hooks: list = []
        self.active = False

    def on(self) -> None:
        if self.active:
            return
        self.active = True
        m = self.model
        # the full rows, or with LoRA the adapter's copies of the new rows (`lora.TokenRows`: nothing to mask)
        keep = {id(p) for mod in (m.embed_tokens, m.lm_head)
                for p in (mod.weight, getattr(mod, "token_rows", None)) if p is not None}
        for p in self.trainable:
            p.requires_grad_(id(p) in keep)
        for p in {id(p): p for p in (m.embed_tokens.weight, m.lm_head.weight)}.values():
            if not p.requires_grad:
                continue
            mask = torch.zeros(p.shape[0], 1, dtype=torch.bool, device=p.device)  # [V, 1]
            mask[self.rows.start:self.rows.stop] = True
            self.hooks.append(p.register_hook(lambda g, mask=mask: g.masked_fill(~mask, 0)))

    def off(self) -> None:
        if not self.active:
            return
        self.active = False
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for p in self.trainable:
            p.requires_grad_(True)

