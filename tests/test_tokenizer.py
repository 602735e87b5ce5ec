"""clip_model's BPE tokenizer gives open_clip's token ids, and tokenize() lays them out as
CLIP expects: SOT, optional prompt placeholders, text, EOT, zero padding.

open_clip's tokenizer always truncates, so it is compared with tokenize(..., truncate=True).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
from clip_model import tokenize  # noqa: E402

open_clip = pytest.importorskip("open_clip")

SOT, EOT = 49406, 49407


def _corpus() -> list[str]:
    """At least 200 strings that exercise every branch of cleaning, splitting and BPE."""
    base = [
        # plain captions, COCO / Flickr style
        "a man riding a wave on top of a surfboard",
        "Two dogs play with a frisbee in the park.",
        "A close-up of a plate with broccoli, rice and chicken",
        "people standing around a kitchen island, talking",
        # punctuation runs and symbols
        "wait... what?!", "hello,world", "(parenthesised) [bracketed] {braced}", "a--b---c",
        "e-mail: someone@example.com", "50% off!!! #sale @store", "C++ / C# / F#", "~`^*_|\\/<>",
        "\"quoted\" and 'single-quoted'", "semi;colon:colon", "ellipsis\u2026 and \u2014 dashes \u2013",
        # numbers: each digit is its own token
        "1234567890", "3.14159", "1,000,000 people", "the 1990s", "room 101b", "\u00bd cup, 2\u00b3, \u2460",
        # accents and non-Latin scripts
        "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e", "na\u00efve fa\u00e7ade", "\u00dcber stra\u00dfe", "se\u00f1or ni\u00f1o",
        "\u0111\u00f8\u0142\u0142", "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u03b1\u03b2\u03b3 \u0394\u03b5\u03bb\u03c4\u03b1",
        "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u0928\u092e\u0938\u094d\u0924\u0947",
        "e\u0301 (combining accent)", "\u0130stanbul", "\ufb01ne ligature",
        # CJK, including full-width forms and ideographic space
        "\u4e00\u53ea\u732b\u5728\u684c\u5b50\u4e0a", "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059",
        "\ud55c\uad6d\uc5b4 \ubb38\uc7a5", "\uff21\uff22\uff23 \uff11\uff12\uff13", "\u732b\u3000\u72ac",
        # emoji, including multi-code-point sequences
        "a dog \U0001f436", "\U0001f600\U0001f600\U0001f600", "family: \U0001f468\u200d\U0001f469\u200d\U0001f467",
        "flag \U0001f1eb\U0001f1f7", "thumbs \U0001f44d\U0001f3fd up", "\u2764\ufe0f love",
        # HTML entities, single and double escaped
        "fish &amp; chips", "it&#39;s raining", "&quot;hello&quot;", "fish &amp;amp; chips",
        "&lt;b&gt;bold&lt;/b&gt;", "caf&eacute;", "&#x1F600; smile", "&nbsp;space", "&amp;#39;", "&bogus;",
        "fish &amp;amp;amp; chips", "<b>fish &amp;amp; chips</b>",  # ftfy unescapes once, unless it sees '<' 
        # mojibake and broken unicode
        "caf\u00c3\u00a9", "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d", "don\u00e2\u20ac\u2122t",
        "\u00c3\u00bcber", "replacement \ufffd char", "lone surrogate-free \u00ad soft hyphen",
        "zero\u200bwidth", "bom\ufeffinside", "control\x07bell", "nul\x00byte", "sep\x1c\x1d\x1e\x1fchars",
        # whitespace runs
        "  leading and trailing  ", "tabs\tin\tbetween", "new\nlines\r\nhere", "many      spaces",
        "\u00a0non-breaking\u00a0", "form\x0cfeed", "line\u2028separator", "\t \n \r",
        # contractions (the pattern splits 's 't 're 've 'm 'll 'd)
        "it's a dog's life", "don't won't can't", "they're we've I'm you'll he'd",
        "IT'S LOUD", "rock 'n' roll", "o'clock", "\u2019curly\u2019 it\u2019s",
        # case
        "UPPER CASE CAPTION", "MiXeD cAsE", "CamelCaseWordsJoined", "ALLCAPSWORD",
        # degenerate
        "", " ", "     ", "\n", "a", "A", ".", "'", "'s", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        # very long captions: must be truncated with EOT kept last
        "a photo of " + "a very " * 60 + "long caption",
        " ".join(str(i) for i in range(200)),
        "\U0001f436" * 100,
        "word, " * 80,
    ]
    variants = []
    for s in base:
        variants += [s, s.upper(), s + ".", "  " + s.title() + "\t"]
    return variants


CORPUS = _corpus()


def test_corpus_is_varied_enough():
    """The comparison below runs on at least 200 strings, some longer than the context."""
    assert len(CORPUS) >= 200
    assert sum(len(clip_model._tokenizer().encode(s)) > 75 for s in CORPUS) >= 4


def test_ids_equal_open_clip():
    """Token ids equal open_clip's, string by string, for the whole corpus."""
    ref = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    ours = tokenize(CORPUS, truncate=True)
    theirs = ref(CORPUS)
    assert ours.shape == theirs.shape == (len(CORPUS), 77)
    mismatched = [(s, ours[i], theirs[i]) for i, s in enumerate(CORPUS) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"{len(mismatched)} strings differ, first: {mismatched[0]}"


def test_layout_sot_text_eot_padding():
    """Every row is SOT, text ids, EOT, then zeros; long rows are cut to 77 with EOT last."""
    tokens = tokenize(CORPUS, truncate=True)
    assert (tokens[:, 0] == SOT).all()
    eot_at = tokens.argmax(dim=-1)
    assert (tokens[torch.arange(len(CORPUS)), eot_at] == EOT).all()
    assert ((tokens == EOT).sum(dim=-1) == 1).all()
    after_eot = torch.arange(77) > eot_at[:, None]
    assert (tokens[after_eot] == 0).all()
    assert (eot_at == 76).sum() >= 4  # the long captions are full rows ending in EOT
    assert tokens[CORPUS.index("")].tolist()[:3] == [SOT, EOT, 0]
    assert torch.equal(tokenize(" "), tokenize(""))  # only whitespace = empty


def test_other_context_lengths():
    """context_length sets the row width; truncation keeps EOT last there too."""
    tokens = tokenize(["a dog", "a photo of " * 20], context_length=32, truncate=True)
    assert tokens.shape == (2, 32)
    assert tokens[1, -1] == EOT and tokens[0, 3] == EOT and tokens[0, 4:].eq(0).all()


def test_prompt_placeholders_follow_sot():
    """prompt_length=M puts M placeholder ids right after SOT and shifts the text by M."""
    M = 4
    placeholder = clip_model._tokenizer().encode(clip_model.PLACEHOLDER)
    assert len(placeholder) == 1
    plain = tokenize(["a dog on a skateboard", ""])
    prompted = tokenize(["a dog on a skateboard", ""], prompt_length=M)
    assert (prompted[:, 1:1 + M] == placeholder[0]).all()
    assert torch.equal(prompted[:, 0], plain[:, 0])
    assert torch.equal(prompted[:, 1 + M:], plain[:, 1:77 - M])
    # Truncation makes room for the placeholders and still ends in EOT.
    long = tokenize("a photo of " * 40, prompt_length=M, truncate=True)
    assert (long[0, 1:1 + M] == placeholder[0]).all() and long[0, -1] == EOT


def test_too_long_without_truncate_raises():
    """truncate=False refuses a text that does not fit, and accepts one that just fits."""
    assert tokenize("a " * 75)[0, -1] == EOT            # 1 + 75 + 1 = 77 tokens: fits
    with pytest.raises(ValueError, match="truncate=True"):
        tokenize("a " * 76)                            # 78 tokens
    with pytest.raises(ValueError):
        tokenize("a " * 73, prompt_length=3)          # the placeholders count too


@pytest.mark.parametrize("text", ["a photo of a dog", "two people riding bicycles down a busy street",
                                  "supercalifragilisticexpialidocious", "x"])
def test_decode_inverts_encode(text):
    """decode(encode(x)) gives x back for lower-case words (each word ends in '</w>' -> ' ')."""
    tok = clip_model._tokenizer()
    assert tok.decode(tok.encode(text)) == text + " "
