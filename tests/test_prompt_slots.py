"""The prompt slots of clip_model's encoders (deep prompting, VPT-deep / MaPLe style).

Prompts P have shape (J, M, D) shared by the batch or (B, J, M, D) per sample. P[0] enters
right after the first token (CLS for images, SOT for text); before block j, 1 <= j < J, the
hidden states at those M positions are replaced by P[j]. With no prompts (None, or J = 0)
the encoders are plain CLIP. All checks run on a TINY CLIP with random weights.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
from clip_model import TINY  # noqa: E402

M = 3                        # prompt length
D_V = TINY.vision_width      # 128
D_T = TINY.transformer_width  # 128
LAYERS = TINY.vision_layers  # 4 (= TINY.transformer_layers)
CAPTIONS = ["a dog", "two red circles on the left of a blue square", ""]


@pytest.fixture(scope="module")
def model() -> clip_model.CLIP:
    torch.manual_seed(0)
    return clip_model.CLIP(TINY).eval().requires_grad_(False)  # frozen, as under LPI


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, TINY.image_resolution, TINY.image_resolution,
                       generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """Captions of mixed lengths, with M placeholder positions after SOT."""
    return clip_model.tokenize(CAPTIONS, context_length=TINY.context_length, prompt_length=M)


def _prompts(J: int, D: int, seed: int = 2, batch: int | None = None) -> torch.Tensor:
    shape = (J, M, D) if batch is None else (batch, J, M, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# The two encoders behind one interface: encode(model, images, tokens, prompts), width D.
ENCODERS = [
    pytest.param(lambda m, x, t, P: m.encode_image(x, P), D_V, id="image"),
    pytest.param(lambda m, x, t, P: m.encode_text(t, P), D_T, id="text"),
]


# ---------------------------------------------------------------------------------------
# Straightforward references: every position of the context, one step per line of the
# docstring above. The encoders should compute exactly this.
# ---------------------------------------------------------------------------------------

def _deep(transformer, x, P, causal):
    """Run the blocks, replacing positions 1..M by P[:, j] before block j (1 <= j < J)."""
    for j, block in enumerate(transformer.resblocks):
        if P is not None and 1 <= j < P.shape[1]:
            x = x.clone()
            x[:, 1:1 + P.shape[2]] = P[:, j]
        x = block(x, causal=causal)
    return x


def reference_image(model, images, P=None):
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)                         # (B, g*g, D)
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding                 # (B, 1+g*g, D)
    if P is not None:
        x = torch.cat([x[:, :1], P[:, 0], x[:, 1:]], dim=1)                 # prompts: no position
    x = _deep(v.transformer, v.ln_pre(x), P, causal=False)
    return v.ln_post(x[:, 0]) @ v.proj


def reference_text(model, tokens, P=None):
    """The whole context (padding included), as open_clip and OpenAI's CLIP run it."""
    x = model.token_embedding(tokens)                                       # (B, L, D)
    if P is not None:
        x = torch.cat([x[:, :1], P[:, 0], x[:, 1 + P.shape[2]:]], dim=1)   # overwrite the placeholders
    x = _deep(model.transformer, x + model.positional_embedding, P, causal=True)
    x = model.ln_final(x)
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ model.text_projection


# ---------------------------------------------------------------------------------------
# No prompts = plain CLIP
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("encode, D", ENCODERS)
def test_no_prompts_is_plain_clip_bit_for_bit(model, images, tokens, encode, D):
    """prompts=None, J = 0 (shape (0, M, D)) and M = 0 give the very same bits."""
    with torch.inference_mode():
        plain = encode(model, images, tokens, None)
        for empty in (torch.zeros(0, M, D), torch.zeros(len(CAPTIONS), 0, M, D), torch.zeros(2, 0, D)):
            assert torch.equal(encode(model, images, tokens, empty), plain)


def test_plain_encoders_match_reference(model, images, tokens):
    """Without prompts, the encoders compute the reference forward pass; for text the
    reference runs the full 32-token context, so this also checks that trimming the
    padding after the last EOT changes nothing."""
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(images), reference_image(model, images),
                                   atol=1e-5, rtol=0)
        full = clip_model.tokenize(CAPTIONS + ["a photo of " * 20], context_length=TINY.context_length,
                                   truncate=True)  # one row fills the context: nothing to trim
        for t in (tokens, clip_model.tokenize(CAPTIONS, context_length=TINY.context_length), full):
            torch.testing.assert_close(model.encode_text(t), reference_text(model, t), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# Prompts do what the docstring says
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("J", [1, 2, LAYERS])
def test_prompted_encoders_match_reference(model, images, tokens, J):
    """Deep prompts of depth J: P[0] after CLS / SOT, P[j] replaces those positions before
    block j; for text this holds with the padding trimmed too."""
    with torch.inference_mode():
        P = _prompts(J, D_V).expand(len(images), -1, -1, -1)
        torch.testing.assert_close(model.encode_image(images, P[0]), reference_image(model, images, P),
                                   atol=1e-5, rtol=0)
        P = _prompts(J, D_T).expand(len(tokens), -1, -1, -1)
        torch.testing.assert_close(model.encode_text(tokens, P[0]), reference_text(model, tokens, P),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("encode, D", ENCODERS)
def test_every_prompt_layer_changes_the_output(model, images, tokens, encode, D):
    """Changing P[j] alone changes the features, for every j < J (here J = all layers)."""
    P = _prompts(LAYERS, D)
    with torch.inference_mode():
        base = encode(model, images, tokens, P)
        assert (base - encode(model, images, tokens, None)).abs().max() > 1e-3
        for j in range(LAYERS):
            changed = P.clone()
            changed[j] += torch.randn(M, D, generator=torch.Generator().manual_seed(10 + j))
            assert (encode(model, images, tokens, changed) - base).abs().max() > 1e-3, f"layer {j}"


def test_text_placeholders_are_overwritten(model, tokens):
    """With prompts given, the placeholder ids do not matter (their embeddings are replaced);
    with prompts=None they are ordinary words."""
    other = tokens.clone()
    other[:, 1:1 + M] = clip_model._tokenizer().encode("zebra")[0]
    P = _prompts(2, D_T)
    with torch.inference_mode():
        assert torch.equal(model.encode_text(tokens, P), model.encode_text(other, P))
        assert (model.encode_text(tokens) - model.encode_text(other)).abs().max() > 1e-3


@pytest.mark.parametrize("encode, D", ENCODERS)
def test_per_sample_prompts(model, images, tokens, encode, D):
    """(B, J, M, D) prompts: a repeated shared prompt gives the shared prompt's features, and
    different prompts per sample give each sample what it would get alone."""
    B, J = len(CAPTIONS), 3
    shared = _prompts(J, D)
    with torch.inference_mode():
        torch.testing.assert_close(encode(model, images, tokens, shared[None].repeat(B, 1, 1, 1)),
                                   encode(model, images, tokens, shared), atol=1e-6, rtol=0)
        per_sample = _prompts(J, D, batch=B)
        together = encode(model, images, tokens, per_sample)
        for b in range(B):
            alone = encode(model, images[b:b + 1], tokens[b:b + 1], per_sample[b])
            torch.testing.assert_close(together[b:b + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encode, D", ENCODERS)
def test_wrong_prompt_shapes_raise(model, images, tokens, encode, D):
    """Wrong width, depth beyond the encoder, wrong batch or wrong rank: ValueError."""
    B = len(CAPTIONS)
    for bad in (torch.zeros(2, M, D + 1),            # D mismatch
                torch.zeros(LAYERS + 1, M, D),       # J > layers
                torch.zeros(B + 1, 2, M, D),         # per-sample, wrong batch
                torch.zeros(M, D)):                  # missing the depth axis
        with pytest.raises(ValueError):
            encode(model, images, tokens, bad)


@pytest.mark.parametrize("encode, D", ENCODERS)
def test_gradients_reach_every_prompt_layer(model, images, tokens, encode, D):
    """Backpropagating through a frozen encoder gives every layer's prompt a gradient."""
    P = _prompts(LAYERS, D).requires_grad_()
    encode(model, images, tokens, P).pow(2).sum().backward()
    assert P.grad is not None
    assert all(P.grad[j].abs().sum() > 0 for j in range(LAYERS))
