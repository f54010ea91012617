"""The tiny CLIP tokenizer makes every listed word one token, whatever the order of the list.

The real CLIPTokenizer (transformers 5, `tokenizers` backend) runs on the vocabularies; no mocks.
"""
from __future__ import annotations

import random

import pytest

from lora_dreambooth.tiny import DEFAULT_WORDS, build_tiny_tokenizer, tiny_clip_vocab

SHAPE_WORDS = tuple("a photo of sks dog cat triangle circle square blue yellow orange purple in on the left right".split())
COLOUR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "teal", "black", "white", "grey")


def orders(words: tuple[str, ...], shuffles: int = 4) -> list[tuple[str, ...]]:
    """The list as given, reversed, sorted both ways, by length both ways, and a few seeded shuffles."""
    rng = random.Random(0)
    result = [words, words[::-1], tuple(sorted(words)), tuple(sorted(words, reverse=True)),
              tuple(sorted(words, key=len)), tuple(sorted(words, key=len, reverse=True))]
    for _ in range(shuffles):
        shuffled = list(words)
        rng.shuffle(shuffled)
        result.append(tuple(shuffled))
    return result


def assert_whole_words(words: tuple[str, ...]) -> None:
    tokenizer = build_tiny_tokenizer(words)
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"], (word, words)
    sentence = " ".join(words)
    assert len(tokenizer(sentence, add_special_tokens=False).input_ids) == len(words), words


@pytest.mark.parametrize("words", [("red", "green"), ("green", "red"), ("re", "red", "green", "greener"),
                                   ("at", "cat", "scatter", "tt", "attack")])
def test_an_earlier_words_merge_never_splits_a_later_word(words):
    assert_whole_words(words)


@pytest.mark.parametrize("words", [SHAPE_WORDS, DEFAULT_WORDS + COLOUR_WORDS], ids=["shapes", "defaults+colours"])
def test_every_word_is_one_token_in_any_order(words):
    for ordered in orders(words):
        assert_whole_words(ordered)


def test_our_bpe_simulation_is_the_tokenizers_bpe():
    """`bpe_pieces` decides which merges to add; it must split any text exactly as the real tokenizer does."""
    from lora_dreambooth.tiny import bpe_pieces

    words = ("red", "green", "triangle", "orange", "reader", "agreed")
    vocab, merges = tiny_clip_vocab(words)
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    tokenizer = build_tiny_tokenizer(words)
    rng = random.Random(1)
    letters = "".join(sorted(set("".join(words))))
    samples = [w + suffix for w in words for suffix in ("", "s", "er")]
    samples += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(300)]
    for text in samples:
        symbols = list(text[:-1]) + [text[-1] + "</w>"]
        assert tokenizer.tokenize(text) == bpe_pieces(symbols, ranks), text
        assert all(piece in vocab for piece in bpe_pieces(symbols, ranks))


def test_default_tiny_base_keeps_its_token_ids():
    """Words that were already whole keep the merges and ids earlier versions gave them (saved bases stay valid)."""
    tokenizer = build_tiny_tokenizer()
    assert tokenizer("a photo of sks dog on the beach").input_ids == [545, 320, 515, 516, 529, 518, 537, 539, 544, 546]
    assert len(tokenizer) == 547
    vocab, merges = tiny_clip_vocab(DEFAULT_WORDS)
    assert len(merges) == 33 and merges[:2] == [("p", "h"), ("ph", "o")]


def test_empty_word_is_refused():
    with pytest.raises(ValueError, match="empty"):
        tiny_clip_vocab(("dog", ""))
