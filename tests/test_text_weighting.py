"""A1111 prompt-attention parsing, per-token weights on chunked ids, and sd-scripts' weighted embedding."""

from __future__ import annotations

import json
import string

import pytest
import torch

from library.errors import UserError
from library.text.encode import encode_prompts, tokenize_prompts, tokenize_weighted_prompts
from library.text.tokenizer import load_packaged_tokenizer, packaged_tokenizer_dir
from library.text.weighting import apply_token_weights, parse_prompt_attention

BOS, EOS, SD2_PAD = 49406, 49407, 0
A, B, C, D = 320, 321, 322, 323


def letters(n: int) -> tuple[list[str], list[int]]:
    table = json.loads((packaged_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    words = [string.ascii_lowercase[i % 26] for i in range(n)]
    return words, [table[w + "</w>"] for w in words]


# The examples in A1111's modules/prompt_parser.py docstring, with its outputs.
A1111_DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

TRICKY = [
    ("", [("", 1.0)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5) b", [("a", 0.5), (" b", 1.0)]),
    ("((a))", [("a", 1.2100000000000002)]),  # 1.1 * 1.1
    ("[[a]]", [("a", 0.8264462809917354)]),  # 1 / 1.1 / 1.1 applied as two multiplications
    ("[a", [("a", 0.9090909090909091)]),
    ("((a) b:1.5)", [("a", 1.6500000000000001), (" b", 1.5)]),  # inner 1.1, outer 1.5
    ("[(a)]", [("a", 1.0)]),  # 1.1 / 1.1 is exactly 1.0 in floating point, so it merges back
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),  # escaped backslash
    ("\\a", [("a", 1.0)]),  # a lone backslash is dropped
    ("\\[x\\] (y)", [("[x] ", 1.0), ("y", 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets with nothing open are text
    ("x:y", [("x:y", 1.0)]),
    ("(x:y)", [("x:y", 1.1)]),  # a colon without a number is text
    (":1.2)", [(":1.2)", 1.0)]),  # a weight with no open bracket is text
    ("(a:1.0) b", [("a b", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets it is no break
    ("aBREAKb break", [("aBREAKb break", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCUMENTED + TRICKY)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_weight_that_is_not_a_number_is_a_user_error():
    with pytest.raises(UserError, match="'1.2.3'"):
        parse_prompt_attention("(a:1.2.3)")


def test_weighted_ids_and_weights_sd1():
    ids, weights = tokenize_weighted_prompts(load_packaged_tokenizer(), ["a (b:1.5) [c]", "(d)"], None)
    assert ids.tolist() == [[[BOS, A, B, C] + [EOS] * 73], [[BOS, D] + [EOS] * 75]]
    expected = torch.tensor([[[1.0, 1.0, 1.5, 1 / 1.1] + [1.0] * 73], [[1.0, 1.1] + [1.0] * 75]])
    assert weights.dtype == torch.float32
    assert torch.equal(weights, expected)


def test_weights_follow_tokens_across_chunks_sd2(sd2):
    words, t = letters(80)
    words[77] = f"({words[77]}:2)"  # token 77 sits in chunk 1, at position 1 + 77 - 75 = 3
    ids, weights = tokenize_weighted_prompts(sd2.tokenizer, [" ".join(words)], 225, v2=True)
    assert ids.tolist() == [
        [
            [BOS] + t[0:75] + [EOS],
            [BOS] + t[75:80] + [EOS] + [SD2_PAD] * 70,
            [BOS, EOS] + [SD2_PAD] * 75,
        ]
    ]
    expected = torch.ones(1, 3, 77)
    expected[0, 1, 3] = 2.0
    assert torch.equal(weights, expected)
    assert torch.equal(ids, tokenize_prompts(sd2.tokenizer, [" ".join(letters(80)[0])], 225, v2=True))


def test_break_starts_a_new_chunk():
    tokenizer = load_packaged_tokenizer(v2=True)
    words, t = letters(75)
    prompts = ["a BREAK (b)", "BREAK c", " ".join(words) + " BREAK d", "a BREAK b BREAK c"]
    ids, weights = tokenize_weighted_prompts(tokenizer, prompts, 150, v2=True)
    closed = [EOS] + [SD2_PAD] * 74
    assert ids[0].tolist() == [[BOS, A] + closed, [BOS, B] + closed]
    assert weights[0, 1, 1].item() == pytest.approx(1.1) and weights[0].sum().item() == pytest.approx(154.1)
    assert ids[1].tolist() == [[BOS] + closed + [SD2_PAD], [BOS, C] + closed]  # an empty chunk first
    assert ids[2].tolist() == [[BOS] + t + [EOS], [BOS, D] + closed]  # a full chunk gets no empty one after it
    assert ids[3].tolist() == [[BOS, A] + closed, [BOS, B] + closed]  # a third chunk does not fit in 150


def test_all_weights_one_gives_the_unweighted_embedding(sd1, sd2):
    long_words = " ".join(letters(160)[0])
    weighted = ["a photo of a cat", "(a:1.0) \\(b\\) [(c)]", long_words]
    plain = ["a photo of a cat", "a (b) c", long_words]
    for model, v2 in ((sd1, False), (sd2, True)):
        with torch.no_grad():
            ids_w, weights = tokenize_weighted_prompts(model.tokenizer, weighted, 225, v2=v2)
            assert torch.equal(ids_w, tokenize_prompts(model.tokenizer, plain, 225, v2=v2))
            assert torch.equal(weights, torch.ones_like(weights))
            args = dict(max_token_length=225, clip_skip=2, v2=v2)
            out_w = encode_prompts(model.text_encoder, model.tokenizer, weighted, weighted=True, **args)
            out = encode_prompts(model.text_encoder, model.tokenizer, plain, **args)
        assert out.shape == (3, 227, 32)
        assert torch.equal(out_w, out)


def test_weighted_token_scales_exactly_its_position_then_the_mean_is_restored(sd1):
    words, _ = letters(80)
    plain = " ".join(words)
    words[78] = f"({words[78]}:1.5)"  # token 78 -> merged position 1 + 78 = 79
    weighted = " ".join(words)
    assert torch.equal(
        tokenize_weighted_prompts(sd1.tokenizer, [weighted], 150)[0], tokenize_prompts(sd1.tokenizer, [plain], 150)
    )
    with torch.no_grad():
        out = encode_prompts(sd1.text_encoder, sd1.tokenizer, [plain], max_token_length=150)
        out_w = encode_prompts(sd1.text_encoder, sd1.tokenizer, [weighted], max_token_length=150, weighted=True)
    assert out.shape == out_w.shape == (1, 152, 32)
    # sd-scripts' rule: out_w = out * w * s with s = mean(out) / mean(out * w)
    scaled = out.clone()
    scaled[0, 79] *= 1.5
    s = out.mean() / scaled.mean()
    before_rescale = out_w / s
    changed = ((before_rescale - out).abs().amax(dim=-1) > 1e-5).nonzero().tolist()
    assert changed == [[0, 79]]
    torch.testing.assert_close(before_rescale[0, 79], 1.5 * out[0, 79], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_w, scaled * s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_w.mean(), out.mean(), atol=1e-6, rtol=1e-5)


def test_apply_token_weights_by_hand():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [2.0, -2.0]]])
    weights = torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 3.0]])
    # prompt 0: mean 2.5; weighted [[1, 2], [6, 8]] has mean 4.25, so everything is scaled by 2.5 / 4.25
    expected0 = torch.tensor([[1.0, 2.0], [6.0, 8.0]]) * (2.5 / 4.25)
    out = apply_token_weights(states, weights)
    torch.testing.assert_close(out[0], expected0)
    assert torch.equal(out[1], states[1])
    assert torch.equal(out[2], torch.tensor([[1.0, -1.0], [6.0, -6.0]]))  # weighted mean 0: weights only
