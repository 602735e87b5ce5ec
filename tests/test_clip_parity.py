"""clip_model.CLIP computes what open_clip computes, given the same weights.

The reference is open_clip built with random weights (`pretrained=None`); its state dict is
handed to clip_model.build_model, so both models hold identical fp32 tensors and any
difference in features is a difference in the forward pass (or in the sizes build_model
inferred). Tolerance: 1e-4 absolute on features of magnitude ~1, fp32 on CPU.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import clip_model  # noqa: E402
from clip_model import CLIPConfig  # noqa: E402

open_clip = pytest.importorskip("open_clip")

ATOL = 1e-4

CAPTIONS = [
    "",                                                          # SOT EOT only
    "a dog",
    "Two people riding bicycles down a busy street next to parked cars, at dusk.",
    "A kitchen with white cabinets, a stainless steel refrigerator, a microwave above the "
    "stove, a bowl of green apples on the counter and a window looking out on a garden.",
]  # (test_prompt_slots checks the rows that fill the whole context)


def _images(n: int, resolution: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, resolution, resolution, generator=g)


def _pair(ref: torch.nn.Module):
    """(our model, open_clip model) holding the very same weights, both in eval mode."""
    ref.eval()
    ours = clip_model.build_model(ref.state_dict())
    return ours, ref


def _assert_same_features(ours, ref, n_images: int):
    res = ours.visual.input_resolution
    images = _images(n_images, res)
    tokens = clip_model.tokenize(CAPTIONS, context_length=ours.context_length, truncate=True)
    with torch.inference_mode():
        img_ours, img_ref = ours.encode_image(images), ref.encode_image(images)
        txt_ours, txt_ref = ours.encode_text(tokens), ref.encode_text(tokens)
    assert img_ours.shape == img_ref.shape == (n_images, ours.cfg.embed_dim)
    assert txt_ours.shape == txt_ref.shape == (len(CAPTIONS), ours.cfg.embed_dim)
    # Random-weight features are O(1); a wrong head count or mask gives errors of O(0.1-1).
    assert img_ref.abs().max() > 0.1 and txt_ref.abs().max() > 0.1
    torch.testing.assert_close(img_ours, img_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(txt_ours, txt_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, n_images", [("ViT-B-16-quickgelu", 2), ("ViT-B-32-quickgelu", 3)])
def test_released_architectures_match_open_clip(name, n_images):
    """ViT-B/16 and ViT-B/32: same weights -> same image and text features as open_clip."""
    torch.manual_seed(0)
    ours, ref = _pair(open_clip.create_model(name, pretrained=None))
    expected_patch = 16 if "B-16" in name else 32
    assert ours.cfg == CLIPConfig(vision_patch_size=expected_patch)  # the defaults are ViT-B/16's sizes
    _assert_same_features(ours, ref, n_images)


def _open_clip_vit(embed_dim, image_size, patch_size, vision_width, vision_layers,
                   text_width, text_layers, context_length):
    """An open_clip CLIP with OpenAI's conventions (QuickGELU, 64-wide heads) and any sizes."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    return CLIP(embed_dim=embed_dim, quick_gelu=True,
                vision_cfg=CLIPVisionCfg(layers=vision_layers, width=vision_width, head_width=64,
                                         patch_size=patch_size, image_size=image_size),
                text_cfg=CLIPTextCfg(width=text_width, heads=max(1, text_width // 64),
                                     layers=text_layers, context_length=context_length))


def test_build_model_infers_tiny_sizes():
    """clip_model.TINY (32x32 images, context 32) survives state dict -> build_model, and
    matches an open_clip model of those sizes."""
    t = clip_model.TINY
    ref = _open_clip_vit(t.embed_dim, t.image_resolution, t.vision_patch_size, t.vision_width,
                         t.vision_layers, t.transformer_width, t.transformer_layers, t.context_length)
    ours, ref = _pair(ref)
    assert ours.cfg == t
    assert (ours.cfg.vision_heads, ours.cfg.transformer_heads) == (2, 2)
    _assert_same_features(ours, ref, n_images=3)

    # And from our own model's state dict, with nothing but the tensors to go on.
    torch.manual_seed(1)
    assert clip_model.build_model(clip_model.CLIP(t).state_dict()).cfg == t


def test_build_model_infers_vit_l14_sizes():
    """ViT-L/14 shapes (width 1024, patch 14, 16 vision heads; text width 768, 12 heads,
    embed 768) are read off the tensors. Depth is cut to 2+2 layers to keep this cheap:
    build_model copies real tensors, so a meta-device state dict cannot stand in."""
    ref = _open_clip_vit(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                         vision_layers=2, text_width=768, text_layers=2, context_length=77)
    ours, ref = _pair(ref)
    assert ours.cfg == CLIPConfig(embed_dim=768, image_resolution=224, vision_layers=2, vision_width=1024,
                                  vision_patch_size=14, context_length=77, vocab_size=49408,
                                  transformer_width=768, transformer_layers=2)
    assert (ours.cfg.vision_heads, ours.cfg.transformer_heads) == (16, 12)
    _assert_same_features(ours, ref, n_images=1)
