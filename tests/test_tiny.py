"""The word-level tokenizer builder behind the tiny test models and the demo model."""

from __future__ import annotations

from transformers import CLIPTokenizer

from peftedit.demo.world import WORDS
from peftedit.tiny import BASE_WORDS, write_tokenizer


def test_every_word_is_one_token_even_when_merges_overlap(tmp_path):
    # "an" is built before "triangle" and "standing", "re" (from "red") before "green" and "tree": a naive merge list
    # lets those earlier merges split the later words.
    words = ["an", "red", "triangle", "standing", "green", "tree", "and"]
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, words)))
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert len(set(tokenizer(" ".join(words), add_special_tokens=False).input_ids)) == len(words)


def test_demo_vocabulary_is_whole_and_other_text_still_tokenizes(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, list(WORDS) + list(BASE_WORDS))))
    words = dict.fromkeys(WORDS + tuple(BASE_WORDS))
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert split == []
    unknown = tokenizer("zebra", add_special_tokens=False).input_ids
    assert len(unknown) > 1 and tokenizer.unk_token_id not in unknown
