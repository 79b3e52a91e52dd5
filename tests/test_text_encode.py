"""Chunked tokenizing and encoding of long prompts, and clip skip, checked against hand-built references."""

from __future__ import annotations

import json
import string

import pytest
import torch

from library.errors import UserError
from library.text.encode import TokenCache, encode_prompts, encode_token_ids, tokenize_prompts
from library.text.tokenizer import load_packaged_tokenizer, packaged_tokenizer_dir

BOS, EOS, SD2_PAD = 49406, 49407, 0


def vocab() -> dict[str, int]:
    return json.loads((packaged_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))


def letters_prompt(n: int) -> tuple[str, list[int]]:
    """A prompt of ``n`` one-letter words a, b, c, … and their ids looked up in vocab.json (each is one token)."""
    words = [string.ascii_lowercase[i % 26] for i in range(n)]
    table = vocab()
    return " ".join(words), [table[w + "</w>"] for w in words]


def chunk(tokens: list[int], tail: list[int]) -> list[int]:
    ids = [BOS] + tokens + tail
    assert len(ids) == 77
    return ids


def test_vocab_lookup_is_one_token_per_letter():
    prompt, ids = letters_prompt(30)
    assert ids[:3] == [320, 321, 322]
    assert load_packaged_tokenizer()(prompt, add_special_tokens=False).input_ids == ids


def test_sd1_150_pads_with_eos():
    prompt, t = letters_prompt(80)
    ids = tokenize_prompts(load_packaged_tokenizer(), [prompt], 150, v2=False)
    expected = [[chunk(t[0:75], [EOS]), chunk(t[75:80], [EOS] * 71)]]
    assert ids.dtype == torch.long
    assert ids.tolist() == expected


def test_sd2_150_pads_with_exclamation_mark():
    prompt, t = letters_prompt(80)
    ids = tokenize_prompts(load_packaged_tokenizer(v2=True), [prompt], 150, v2=True)
    # chunk 0 is cut mid-prompt, so its last id (padding in the full sequence) becomes EOS
    expected = [[chunk(t[0:75], [EOS]), chunk(t[75:80], [EOS] + [SD2_PAD] * 70)]]
    assert ids.tolist() == expected


def test_225_batch_sd1_and_sd2():
    long_prompt, t = letters_prompt(80)
    full_prompt, f = letters_prompt(150)
    over_prompt, o = letters_prompt(300)
    prompts = [long_prompt, full_prompt, over_prompt, "b c"]

    ids1 = tokenize_prompts(load_packaged_tokenizer(), prompts, 225, v2=False)
    assert ids1.shape == (4, 3, 77)
    assert ids1[0].tolist() == [chunk(t[0:75], [EOS]), chunk(t[75:80], [EOS] * 71), chunk([], [EOS] * 76)]
    assert ids1[1].tolist() == [chunk(f[0:75], [EOS]), chunk(f[75:150], [EOS]), chunk([], [EOS] * 76)]
    assert ids1[2].tolist() == [chunk(o[0:75], [EOS]), chunk(o[75:150], [EOS]), chunk(o[150:225], [EOS])]
    assert ids1[3].tolist() == [chunk([321, 322], [EOS] * 74), chunk([], [EOS] * 76), chunk([], [EOS] * 76)]

    ids2 = tokenize_prompts(load_packaged_tokenizer(v2=True), prompts, 225, v2=True)
    pad_only = chunk([], [EOS] + [SD2_PAD] * 75)  # "BOS ! ! …" becomes "BOS EOS ! …"
    assert ids2[0].tolist() == [chunk(t[0:75], [EOS]), chunk(t[75:80], [EOS] + [SD2_PAD] * 70), pad_only]
    # the prompt's own EOS falls at the start of chunk 2, which then needs no fix
    assert ids2[1].tolist() == [chunk(f[0:75], [EOS]), chunk(f[75:150], [EOS]), pad_only]
    # truncated: the sequence ends with the truncation EOS
    assert ids2[2].tolist() == [chunk(o[0:75], [EOS]), chunk(o[75:150], [EOS]), chunk(o[150:225], [EOS])]
    assert ids2[3].tolist() == [chunk([321, 322], [EOS] + [SD2_PAD] * 73), pad_only, pad_only]


@pytest.mark.parametrize("max_token_length", [None, 75])
def test_default_length_is_one_plain_chunk(max_token_length):
    prompt, t = letters_prompt(80)
    ids1 = tokenize_prompts(load_packaged_tokenizer(), [prompt, "b c"], max_token_length, v2=False)
    assert ids1.tolist() == [[chunk(t[:75], [EOS])], [chunk([321, 322], [EOS] * 74)]]
    ids2 = tokenize_prompts(load_packaged_tokenizer(v2=True), [prompt, "b c"], max_token_length, v2=True)
    assert ids2.tolist() == [[chunk(t[:75], [EOS])], [chunk([321, 322], [EOS] + [SD2_PAD] * 73)]]


def test_bad_max_token_length_and_tokenizer_mismatch_are_user_errors():
    with pytest.raises(UserError, match="--max_token_length 100"):
        tokenize_prompts(load_packaged_tokenizer(), ["a"], 100)
    with pytest.raises(UserError, match="--v2"):
        tokenize_prompts(load_packaged_tokenizer(v2=False), ["a"], 150, v2=True)
    with pytest.raises(UserError, match="--v2"):
        tokenize_prompts(load_packaged_tokenizer(v2=True), ["a"], 150, v2=False)


def hand_assembly(text_encoder, ids: torch.Tensor, encode) -> torch.Tensor:
    """Encode each chunk on its own and join: chunk 0's BOS, every chunk's positions 1..75, the last chunk's end."""
    per_chunk = [encode(text_encoder, ids[:, c]) for c in range(ids.shape[1])]
    parts = [per_chunk[0][:, :1]] + [states[:, 1:76] for states in per_chunk] + [per_chunk[-1][:, 76:]]
    return torch.cat(parts, dim=1)


def last_hidden(text_encoder, ids):
    return text_encoder(ids)[0]


@pytest.mark.parametrize(("v2", "max_token_length", "length"), [(False, 225, 227), (True, 150, 152), (False, None, 77)])
def test_hidden_states_equal_hand_assembly(v2, max_token_length, length, sd1, sd2):
    model = sd2 if v2 else sd1
    prompts = [letters_prompt(80)[0], letters_prompt(160)[0], "b c"]
    with torch.no_grad():
        out = encode_prompts(model.text_encoder, model.tokenizer, prompts, max_token_length=max_token_length, v2=v2)
        ids = tokenize_prompts(model.tokenizer, prompts, max_token_length, v2)
        expected = hand_assembly(model.text_encoder, ids, last_hidden)
    assert out.shape == (3, length, 32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], model.text_encoder(ids[:, 0])[0][:, 0].detach(), atol=1e-6, rtol=0)


def hand_layers(text_encoder, ids: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Embeddings then the first ``n_layers`` encoder layers, with a causal mask built here."""
    states = text_encoder.embeddings(input_ids=ids)
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(ids.shape[0], 1, length, length)
    for layer in text_encoder.encoder.layers[:n_layers]:
        states = layer(states, mask)
    return states


@pytest.mark.parametrize("clip_skip", [2, 3, 4])
def test_clip_skip_is_earlier_layer_then_final_layer_norm(clip_skip, sd1):
    te = sd1.text_encoder
    ids = tokenize_prompts(sd1.tokenizer, ["a photo of a cat", "b c"])
    with torch.no_grad():
        reference_full = te.final_layer_norm(hand_layers(te, ids[:, 0], 4))
        torch.testing.assert_close(reference_full, te(ids[:, 0])[0], atol=1e-6, rtol=0)  # the hand runner is right
        expected = te.final_layer_norm(hand_layers(te, ids[:, 0], 4 - (clip_skip - 1)))
        out = encode_token_ids(te, ids, clip_skip=clip_skip)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (out - reference_full).abs().max() > 1e-3


def test_clip_skip_one_is_the_normal_output_and_too_large_is_a_user_error(sd1):
    te = sd1.text_encoder
    ids = tokenize_prompts(sd1.tokenizer, ["a photo of a cat"], 150)
    with torch.no_grad():
        assert torch.equal(encode_token_ids(te, ids, clip_skip=1), encode_token_ids(te, ids, clip_skip=None))
    with pytest.raises(UserError, match="--clip_skip 5"):
        encode_token_ids(te, ids, clip_skip=5)


def test_clip_skip_with_chunks_equals_hand_assembly(sd2):
    te = sd2.text_encoder
    prompts = [letters_prompt(100)[0], "b"]
    with torch.no_grad():
        out = encode_prompts(te, sd2.tokenizer, prompts, max_token_length=150, clip_skip=2, v2=True)
        ids = tokenize_prompts(sd2.tokenizer, prompts, 150, v2=True)
        expected = hand_assembly(te, ids, lambda m, x: m.final_layer_norm(hand_layers(m, x, 3)))
    assert out.shape == (2, 152, 32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_unpadded_ids_are_encoded_as_they_are(sd1):
    te = sd1.text_encoder
    ids = sd1.tokenizer(["a photo", "b"], padding=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 4)
    with torch.no_grad():
        assert torch.equal(encode_token_ids(te, ids), te(ids)[0])


def test_gradients_reach_the_text_encoder(tiny_sd1):
    te = tiny_sd1.text_encoder
    out = encode_prompts(te, tiny_sd1.tokenizer, ["a photo of a cat"], max_token_length=150, clip_skip=2)
    out.square().sum().backward()
    assert te.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert te.final_layer_norm.weight.grad.abs().sum() > 0
    assert te.encoder.layers[-1].mlp.fc1.weight.grad is None  # clip skip 2 never uses the last layer's output


class CountingTokenizer:
    """Wraps a tokenizer and records the prompts of every call (for the cache tests)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[list[str]] = []

    def __call__(self, texts, *args, **kwargs):
        self.calls.append(list(texts))
        return self.tokenizer(texts, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize(
    ("v2", "max_token_length", "weighted"), [(False, None, False), (True, 150, False), (False, 225, True)]
)
def test_token_cache_gives_the_same_states_and_tokenizes_each_prompt_once(v2, max_token_length, weighted, sd1, sd2):
    model = sd2 if v2 else sd1
    tokenizer = CountingTokenizer(model.tokenizer)
    cache = TokenCache()
    long_prompt = letters_prompt(160)[0]
    batches = [["(a) photo", long_prompt, "b c"], ["b c", "(a) photo", "b c"], [long_prompt, "new [one]"]]
    options = dict(max_token_length=max_token_length, v2=v2, weighted=weighted)
    with torch.no_grad():
        for prompts in batches:
            cached = encode_prompts(model.text_encoder, tokenizer, prompts, cache=cache, **options)
            plain = encode_prompts(model.text_encoder, model.tokenizer, prompts, **options)
            assert torch.equal(cached, plain)
    if not weighted:  # weighted prompts are tokenized run by run; plain ones in one call per batch
        assert tokenizer.calls == [["(a) photo", long_prompt, "b c"], ["new [one]"]]
    assert len(cache) == 4


def test_token_cache_is_bounded_and_starts_afresh_for_another_tokenizer_or_options(sd1, sd2):
    cache = TokenCache(max_prompts=2)
    ids, weights = cache.tokens(sd1.tokenizer, ["a", "b", "c"], None, False, False)
    assert weights is None and torch.equal(ids, tokenize_prompts(sd1.tokenizer, ["a", "b", "c"]))
    assert len(cache) == 2  # the least recently used prompt ("a") went
    counting = CountingTokenizer(sd1.tokenizer)
    cache.tokens(counting, ["c"], None, False, False)
    assert counting.calls == [["c"]]  # another tokenizer object: nothing cached is reused
    cache.tokens(counting, ["c"], 150, False, False)
    assert counting.calls == [["c"], ["c"]]  # another --max_token_length
    ids, _ = cache.tokens(sd2.tokenizer, ["c"], 150, True, False)
    assert torch.equal(ids, tokenize_prompts(sd2.tokenizer, ["c"], 150, v2=True))
