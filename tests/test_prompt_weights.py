"""The prompt-weighting parser, table-driven, and chunking of long prompts."""

import numpy as np
import pytest
from transformers import CLIPTokenizer

from kiln.models.tokenizer import write_clip_tokenizer
from kiln.pipeline.prompt_weights import apply_weights, parse, tokenize_weighted

W = 1.1

CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", W)]),
    ("a [cat]", [("a ", 1.0), ("cat", 1 / W)]),
    ("a (cat:1.5) sat", [("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]),
    ("((cat))", [("cat", W * W)]),
    ("[[cat]]", [("cat", 1 / W / W)]),
    ("((cat:1.5))", [("cat", 1.5 * W)]),
    ("(a (cat) b)", [("a ", W), ("cat", W * W), (" b", W)]),
    ("(cat:0.5) and [dog]", [("cat", 0.5), (" and ", 1.0), ("dog", 1 / W)]),
    (r"a \(cat\)", [("a (cat)", 1.0)]),
    (r"a \[cat\] \\ b", [("a [cat] \\ b", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", 1.0), ("a dog", 1.0)]),
    ("(a cat BREAK a dog)", [("a cat", W), ("BREAK", 1.0), ("a dog", W)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("(unclosed", [("unclosed", W)]),
    ("[unclosed", [("unclosed", 1 / W)]),
    ("stray) paren]", [("stray) paren]", 1.0)]),
    ("time: 12", [("time: 12", 1.0)]),
    ("(cat:-0.5)", [("cat", -0.5)]),
    ("", []),
    # : and | are text outside square brackets, and inside round ones within them
    ("a | b: c", [("a | b: c", 1.0)]),
    ("[a (b|c:1.2)]", [("a ", 1 / W), ("b|c", 1.2 / W)]),
    (r"\[cat:dog:0.5\]", [("[cat:dog:0.5]", 1.0)]),
]


@pytest.mark.parametrize("prompt, expected", CASES)
def test_parse(prompt, expected):
    got = parse(prompt)
    assert [f.text for f in got] == [t for t, _ in expected]
    assert np.allclose([f.weight for f in got], [w for _, w in expected])


@pytest.mark.parametrize("prompt", ["a [cat:dog:0.5] sat", "[cat:dog:10]", "[cat:0.3]", "[cat::0.3]", "[cat|dog]",
                                    "[[a|b]]", "((x)) [cat (y) : dog: 3]", "[time:12:30]", "[x [y] | z]"])
def test_prompt_editing_and_alternation_are_refused_not_read_as_text(prompt):
    """A1111's [from:to:when] and [a|b] change the embedding during the loop; this server draws one
    embedding, so they are refused by name instead of being drawn as the words 'cat:dog:0.5'."""
    from kiln.errors import RequestError

    with pytest.raises(RequestError, match=r"prompt editing \[from:to:when\] or alternation") as err:
        parse(prompt, "negative_prompt")
    assert err.value.field == "negative_prompt" and (":" in err.value.value or "|" in err.value.value)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_plain_prompt_tokenizes_as_diffusers_does(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a photo of a cat")
    expected = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert chunks.ids.shape == (1, 77) and chunks.ids[0].tolist() == expected
    assert not chunks.weighted


def test_weights_follow_their_tokens(tokenizer):
    chunks = tokenize_weighted(tokenizer, "a (red:1.5) cat")
    assert chunks.ids[0, :5].tolist() == [49406, 320, 736, 2368, 49407]
    assert chunks.weights[0, :5].tolist() == [1.0, 1.0, 1.5, 1.0, 1.0]


def test_long_prompts_and_break_make_chunks(tokenizer):
    long = " ".join(["cat"] * 100)
    chunks = tokenize_weighted(tokenizer, long)
    assert chunks.ids.shape == (2, 77)
    assert (chunks.ids[:, 0] == 49406).all() and chunks.ids[0, 76] == 49407
    assert (chunks.ids[0, 1:76] == 2368).all() and (chunks.ids[1, 1:26] == 2368).all() and chunks.ids[1, 26] == 49407
    broken = tokenize_weighted(tokenizer, "a cat BREAK a dog")
    assert broken.ids.shape == (2, 77) and broken.ids[1, :4].tolist() == [49406, 320, 1929, 49407]
    assert tokenize_weighted(tokenizer, "a cat", min_chunks=3).ids.shape == (3, 77)


def test_apply_weights_restores_the_mean():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((2, 77, 8)).astype(np.float32) + 0.3
    weights = np.ones((2, 77), np.float32)
    assert np.array_equal(apply_weights(embeddings, weights), embeddings.reshape(1, 154, 8))
    weights[0, 3] = 1.5
    out = apply_weights(embeddings, weights)
    assert out.shape == (1, 154, 8)
    chunks = out.reshape(2, 77, 8)
    assert np.isclose(chunks[0].mean(), embeddings[0].mean(), rtol=1e-5)  # per chunk, as A1111
    assert np.array_equal(chunks[1], embeddings[1])  # a chunk without weights is left exactly as encoded
    ratio = chunks / embeddings
    assert np.allclose(ratio[0, 3], 1.5 * ratio[0, 4])
    centred = embeddings - embeddings.mean(axis=(1, 2), keepdims=True)  # no mean to restore: weights scale, nothing else
    assert np.allclose(apply_weights(centred, weights).reshape(2, 77, 8)[0, 3], 1.5 * centred[0, 3])


def test_cli_help_shows_the_weight_syntax():
    """Rich reads [word] as markup and printed "(word), , (word:1.5)"."""
    from typer.testing import CliRunner

    from kiln.cli import app

    for args in (["--help"], ["generate", "--help"]):
        shown = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert "(word), [word], (word:1.5)" in shown.output, shown.output
