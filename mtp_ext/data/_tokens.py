"""Turning texts into evaluation token sequences and translation examples."""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: whole novels exceed model_max_length, and the warning about it is noise here.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_id(tokenizer: Any, add_bos: bool | None) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        return bos
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return bos if add_bos else None


def token_sequences(
    tokenizer: Any,
    texts: Iterable[str],
    seq_len: int,
    max_tokens: int | None = None,
    add_bos: bool | None = None,
) -> list[list[int]]:
    """Cut tokenised documents into sequences of `seq_len` token ids for perplexity-style evaluation.

    Each sequence is BOS (when the tokenizer has one, or as `add_bos` says) followed by consecutive
    tokens of one document; sequences never span two documents, and a document's tail shorter than a
    full sequence is dropped. A sequence of n tokens has n - 1 evaluated (predicted) tokens. Sequences
    are taken in document order until `max_tokens` evaluated tokens (None: all); the last one is cut
    short so that the total is exactly `max_tokens` when the texts hold enough (so it is full-length
    whenever `max_tokens` is a multiple of seq_len - 1). Documents are tokenised lazily, in order,
    so the result is deterministic and only as much text is tokenised as needed.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the documents.
        seq_len: tokens per sequence, BOS included (>= 2).
        max_tokens: the evaluated tokens wanted; None: all the texts give.
        add_bos: whether to start with BOS; None: when the tokenizer has one.

    Returns:
        Token id lists of seq_len tokens (the last one possibly shorter).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos = _bos_id(tokenizer, add_bos)
    prefix = [bos] if bos is not None else []
    body = seq_len - len(prefix)
    sequences: list[list[int]] = []
    evaluated = 0
    if max_tokens is not None and max_tokens <= 0:
        return sequences
    for text in texts:
        ids = _encode(tokenizer, text)
        for start in range(0, len(ids) - body + 1, body):
            seq = prefix + ids[start : start + body]
            if max_tokens is not None:
                seq = seq[: max_tokens - evaluated + 1]
            sequences.append(seq)
            evaluated += len(seq) - 1
            if max_tokens is not None and evaluated >= max_tokens:
                return sequences
    return sequences


def translation_examples(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    max_examples: int | None,
    template: str = "English: {src}\nSpanish: ",
    add_bos: bool | None = None,
    seed: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, target_ids) for scoring only the target side of translation pairs.

    The prompt is `template` with {src} filled in, prefixed with BOS as in token_sequences. Trailing
    spaces of the prompt are moved to the front of the target, because word-piece tokenizers attach a
    space to the word after it ("Spanish:" + " Dios", not "Spanish: " + "Dios"). target_ids are taken
    from tokenising prompt + target together whenever that starts with prompt_ids, so that
    prompt_ids + target_ids is exactly how the model would see the text. Pairs are taken in order
    (or shuffled with random.Random(seed) if a seed is given); empty ones are skipped.

    Args:
        tokenizer: a Hugging Face tokenizer.
        pairs: (source, target) texts.
        max_examples: the examples wanted; None: all.
        template: the prompt, with {src} for the source text.
        add_bos: whether to start with BOS; None: when the tokenizer has one.
        seed: shuffle the pairs with this seed; None: keep their order.

    Returns:
        (prompt_ids, target_ids) token id lists.
    """
    bos = _bos_id(tokenizer, add_bos)
    order = list(range(len(pairs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    examples: list[tuple[list[int], list[int]]] = []
    for i in order:
        if max_examples is not None and len(examples) >= max_examples:
            break
        src, tgt = pairs[i][0].strip(), pairs[i][1].strip()
        if not src or not tgt:
            continue
        prompt = template.format(src=src)
        stripped = prompt.rstrip(" ")
        target = prompt[len(stripped) :] + tgt
        prompt_ids = ([bos] if bos is not None else []) + _encode(tokenizer, stripped)
        full = ([bos] if bos is not None else []) + _encode(tokenizer, stripped + target)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            target_ids = full[len(prompt_ids) :]
        else:
            target_ids = _encode(tokenizer, target)
        examples.append((prompt_ids, target_ids))
    return examples


def spread_prompts(tokenizer: Any, text: str, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` token ids taken at even strides over the tokenised `text`, for
    decoding benchmarks and tests (no BOS: each starts mid-text).

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the text.
        count: prompts wanted (>= 1).
        length: tokens per prompt.

    Returns:
        Token id lists, the i-th starting at token i * (text tokens // count).
    """
    ids = _encode(tokenizer, text)
    stride = len(ids) // count
    if stride < length:
        raise ValueError(f"{len(ids)} tokens of text cannot hold {count} prompts of {length} tokens")
    return [ids[index * stride:index * stride + length] for index in range(count)]
