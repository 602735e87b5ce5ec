"""CLIP from scratch: BPE tokenizer, ViT image encoder, causal text transformer, weight loading.

Follows Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (2021) and loads OpenAI's released ViT checkpoints unchanged: parameter names
are the checkpoint's names. The one addition is a *prompt slot* in each encoder (deep
prompting, VPT / MaPLe style) that LPI (lpi.py) fills; with no prompts this is plain CLIP.

Reading order: tokenizer -> building blocks -> the two encoders -> CLIP -> config and
build_model -> load() and preprocessing -> reading weights as users hold them (OpenAI's
names, Hugging Face folders, trusted TorchScript).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html
import json
import os
import urllib.request
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import ftfy
import regex as re
import torch
import torch.nn.functional as F
from torch import nn

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

# CLIP's own image statistics (not ImageNet's): the released weights were trained with these.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------
# 1. Tokenizer: byte-level BPE over a lower-cased, cleaned string
# ----------------------------------------------------------------------------------------

@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character.

    BPE merges operate on strings, so each byte needs a visible stand-in; the printable
    Latin-1 bytes stand for themselves and the rest are shifted to 256+. This is the table
    the released vocabulary was built with, *including its order* (printable bytes first):
    the first 256 vocabulary entries are this dict's values in order.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _clean(text: str) -> str:
    """Repair mojibake, undo (double) HTML escaping, collapse whitespace, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text.strip()).strip().lower()


class Tokenizer:
    """CLIP's byte-level BPE with 49,408 tokens: 256 bytes x 2 (with / without end-of-word),
    48,894 merges, and the two special tokens <|startoftext|>, <|endoftext|>.

    As in OpenAI's tokenizer, the literal text "<|endoftext|>" inside a caption becomes the
    special token (open_clip splits it into ordinary pieces); no real caption contains it."""

    # Words, single digits, contractions and runs of other symbols are BPE'd separately.
    PATTERN = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        re.IGNORECASE)

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, word: str) -> str:
        """Merge the characters of one word, lowest-ranked pair first, until no merge applies."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # the last symbol carries end-of-word
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = " ".join(parts)
        self.cache[word] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.PATTERN.findall(_clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def _tokenizer() -> Tokenizer:
    return Tokenizer()


PLACEHOLDER = "X"  # CoOp's stand-in word for prompt positions; its embedding is overwritten


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False,
             prompt_length: int = 0) -> torch.LongTensor:
    """Token ids `SOT [X]*prompt_length text EOT`, zero-padded: (len(texts), context_length).

    The M = prompt_length placeholders reserve the positions 1..M that text prompts
    overwrite (encode_text). `truncate=True` cuts long texts and keeps EOT last, since the
    text feature is read at EOT; otherwise a text that does not fit is an error.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok = _tokenizer()
    placeholders = tok.encode(PLACEHOLDER) * prompt_length
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot] + placeholders + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {i} needs {len(ids)} tokens, more than the context length "
                                 f"{context_length}; pass truncate=True to cut it: {text[:80]!r}")
            ids = ids[:context_length]
            ids[-1] = tok.eot
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# ----------------------------------------------------------------------------------------
# 2. Building blocks: pre-LN residual attention blocks
# ----------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (fp16 statistics overflow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation the released CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP's activation. OpenAI's releases were trained with QuickGELU; LAION's and DataComp's
# (open_clip's names without -quickgelu) with the exact GELU. The weights do not say which: a
# model built with the other one loads without complaint and computes other features.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class SelfAttention(nn.Module):
    """Multi-head self-attention. The parameters carry torch.nn.MultiheadAttention's names
    (in_proj_weight stacks W_q, W_k, W_v) because the checkpoints were saved from it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)        # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, N, D/h)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))       # (B, N, D)


class ResidualAttentionBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); MLP = Linear(D, 4D) -> activation -> Linear(4D, D)."""

    def __init__(self, width: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", ACTIVATIONS[activation]()),   # named as in the checkpoints (no parameters)
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks with the deep-prompt slot.

    Prompts P of shape (B, J, M, D): the encoder has already placed P[:, 0] at positions
    start..start+M-1 of its input; before block j (1 <= j < J) the hidden states h at those
    positions become, by `deep`:
      "replace": P[:, j] (VPT-deep / MaPLe): every prompted layer sees fresh learned tokens;
      "add":     h + P[:, j]: the prompt tokens keep what the previous blocks made of them,
                 and P[:, j] steers that (a residual update, as the block's own output is).
    """
    DEEP_MODES = ("replace", "add")

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, activation) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False, prompts: torch.Tensor | None = None,
                start: int = 1, deep: str = "replace") -> torch.Tensor:
        if deep not in self.DEEP_MODES:
            raise ValueError(f"deep must be one of {self.DEEP_MODES}, not {deep!r}")
        for j, block in enumerate(self.resblocks):
            if prompts is not None and 1 <= j < prompts.shape[1]:
                M = prompts.shape[2]
                P_j = prompts[:, j].to(x.dtype)                               # (B, M, D)
                if deep == "add":
                    P_j = x[:, start:start + M] + P_j
                # torch.cat (not an in-place write) keeps the graph for the prompts' gradient
                x = torch.cat([x[:, :start], P_j, x[:, start + M:]], dim=1)
            x = block(x, causal)
        return x


def _batch_prompts(prompts: torch.Tensor | None, B: int, layers: int, width: int) -> torch.Tensor | None:
    """Accept prompts shared by the batch (J, M, D) or per sample (B, J, M, D); return
    (B, J, M, D), or None for no prompts (None or J = 0), which is exactly plain CLIP."""
    if prompts is None:
        return None
    if prompts.dim() == 3:
        prompts = prompts.unsqueeze(0).expand(B, -1, -1, -1)
    if prompts.dim() != 4 or prompts.shape[0] != B or prompts.shape[-1] != width:
        raise ValueError(f"prompts must be (J, M, {width}) or ({B}, J, M, {width}), got {tuple(prompts.shape)}")
    if prompts.shape[1] > layers:
        raise ValueError(f"prompt depth J={prompts.shape[1]} exceeds the encoder's {layers} layers")
    if prompts.shape[1] == 0 or prompts.shape[2] == 0:
        return None
    return prompts


# ----------------------------------------------------------------------------------------
# 3. The two encoders
# ----------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT: patchify by a strided conv, prepend CLS, add positions, pre-LN, transformer,
    LN of the CLS output, linear projection into the joint embedding space."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, activation: str = "quick_gelu"):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None, deep: str = "replace") -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))       # (B, D, g, g)
        B, D = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)                          # (B, g*g, D)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+g*g, D)
        P = _batch_prompts(prompts, B, self.transformer.layers, D)
        if P is not None:
            # Layer-0 prompts go right after CLS, with no positional embedding: they are
            # not image locations. They pass through ln_pre like the patch tokens.
            x = torch.cat([x[:, :1], P[:, 0].to(x.dtype), x[:, 1:]], dim=1)  # (B, 1+M+g*g, D)
        x = self.ln_pre(x)
        x = self.transformer(x, causal=False, prompts=P, start=1, deep=deep)
        return self.ln_post(x[:, 0]) @ self.proj                  # (B, embed_dim)


class CLIP(nn.Module):
    """The dual encoder. The text tower lives at the top level (not in a submodule) because
    that is where the released checkpoints keep its parameters."""

    def __init__(self, cfg: "CLIPConfig"):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size, cfg.vision_width,
                                        cfg.vision_layers, cfg.vision_heads, cfg.embed_dim, cfg.activation)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads,
                                       cfg.activation)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())  # learned temperature, log-space
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation, used only when training from scratch (the tiny model):
        residual-branch outputs are scaled down by sqrt(2 * layers) so depth does not
        blow up the residual stream."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            attn_std = tower.width ** -0.5
            proj_std = attn_std * (2 * tower.layers) ** -0.5
            fc_std = (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
                     deep: str = "replace") -> torch.Tensor:
        """images (B, 3, H, W), normalised with CLIP_MEAN / CLIP_STD -> features (B, embed_dim).
        prompts: (J, M, D_v) shared or (B, J, M, D_v) per sample; None = plain CLIP.
        deep: how P[j >= 1] meets the hidden states, "replace" or "add" (see Transformer)."""
        return self.visual(images, prompts, deep)

    def encode_text(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None,
                    deep: str = "replace") -> torch.Tensor:
        """tokens (B, L) from tokenize() -> features (B, embed_dim), read at EOT.

        prompts: (J, M, D_t) shared or (B, J, M, D_t) per sample, for tokens made with
        tokenize(..., prompt_length=M): P[:, 0] replaces the M placeholder embeddings after
        SOT (they then get positional embeddings like any word, as in CoOp). deep: as in
        encode_image."""
        B = tokens.shape[0]
        eot = tokens.argmax(dim=-1)  # EOT has the highest id in the vocabulary
        # Causal attention: nothing after the longest EOT can reach any EOT, so dropping the
        # padding changes no output and saves most of the work on short captions.
        L = int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :L]).to(self.dtype)    # (B, L, D)
        P = _batch_prompts(prompts, B, self.transformer.layers, x.shape[-1])
        if P is not None:
            M = P.shape[2]
            x = torch.cat([x[:, :1], P[:, 0].to(x.dtype), x[:, 1 + M:]], dim=1)
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.transformer(x, causal=True, prompts=P, start=1, deep=deep)
        x = self.ln_final(x)
        return x[torch.arange(B, device=x.device), eot] @ self.text_projection  # (B, embed_dim)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits image->text (B_img, B_txt) and text->image, as in the paper's pseudo-code."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


class FrozenCLIP(nn.Module):
    """What every prompt method shares (LPI and its baselines): a CLIP that takes no gradient
    and stays in eval mode whatever mode the method is put in, and its sizes."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.D_v, self.D_t = clip.visual.transformer.width, clip.transformer.width
        self.depth = min(clip.visual.transformer.layers, clip.transformer.layers)  # most layers J may prompt

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self


def symmetric_info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Row i's positive is column i, in both directions: (CE(logits) + CE(logits^T)) / 2."""
    logits = logits.float()  # the softmax of a bf16/fp16 logit matrix loses the small terms
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's contrastive loss on a batch of matching pairs (row i <-> column i):
        L = symmetric_info_nce(exp(s) * norm(img) @ norm(txt)^T)
    with exp(s) capped at 100 as in CLIP's training (OpenAI's weights sit at the cap). The
    tiny CLIP is pre-trained with it and LPI trains its prompts with it (L_clip)."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    return symmetric_info_nce(logit_scale.float().exp().clamp(max=100) * img @ txt.t())  # (B, B) logits


# ----------------------------------------------------------------------------------------
# 4. Configuration and building a model from a state dict
# ----------------------------------------------------------------------------------------

@dataclass
class CLIPConfig:
    embed_dim: int = 512            # joint embedding space
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_layers: int = 12
    activation: str = "quick_gelu"  # of the MLPs, a key of ACTIVATIONS

    # The released models use 64-dimensional heads; build_model cannot read the head count
    # from the tensors, so it is derived from the width, here and there alike.
    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // 64)

    @property
    def transformer_heads(self) -> int:
        return max(1, self.transformer_width // 64)


# ViT-B/16 is the default above. TINY trains on a laptop CPU (lpi.py's built-in data):
# 32x32 images cut into 4x4 patches of 8x8 pixels (17 tokens with CLS: 4x cheaper than 4x4
# pixel patches, and it learned the built-in scenes faster in our probe), 4+4 layers of
# width 128. Most of its ~8M parameters are the 49,408-row token embedding, which costs
# lookups, not FLOPs.
TINY = CLIPConfig(embed_dim=128, image_resolution=32, vision_layers=4, vision_width=128,
                  vision_patch_size=8, context_length=32, transformer_width=128, transformer_layers=4)

# The released architectures, for building one with random weights (lpi.py --clip random:NAME).
ARCHITECTURES = {
    "ViT-B/32": CLIPConfig(vision_patch_size=32),
    "ViT-B/16": CLIPConfig(),
    "ViT-L/14": CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14,
                           transformer_width=768),
}


class CLIPLoadError(RuntimeError):
    """A checkpoint that cannot become a CLIP model; the message says why and what to pass."""


# Entries of released / traced archives that are not parameters of the model.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")


def _count_layers(state_dict: dict, prefix: str) -> int:
    return len({k.split(".")[len(prefix.split("."))] for k in state_dict
                if k.startswith(prefix + ".") and k.endswith(".attn.in_proj_weight")})


def build_model(state_dict: dict, activation: str = "quick_gelu") -> CLIP:
    """Build a CLIP whose every size is read off the tensors (OpenAI's names), and load the
    weights. The activation is not in the tensors: OpenAI's releases use QuickGELU."""
    sd = {k: v for k, v in state_dict.items()
          if k not in _NON_PARAMETER_KEYS and not k.endswith("attn_mask")}
    if "visual.layer1.0.conv1.weight" in sd or "visual.attnpool.positional_embedding" in sd:
        raise CLIPLoadError("this is a ResNet CLIP checkpoint (RN50/RN101/...); only the ViT image "
                            "encoders are implemented here: pass a ViT checkpoint (ViT-B/32, ViT-B/16, ViT-L/14)")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
              "positional_embedding", "text_projection", "ln_final.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        some = ", ".join(list(sd)[:5]) or "nothing"
        raise CLIPLoadError(f"not a CLIP ViT state dict: it lacks {', '.join(missing)} "
                            f"(it holds {len(sd)} entries, e.g. {some})")
    conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    cfg = CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=conv.shape[-1] * grid,
        vision_layers=_count_layers(sd, "visual.transformer.resblocks"),
        vision_width=conv.shape[0],
        vision_patch_size=conv.shape[-1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_layers=_count_layers(sd, "transformer.resblocks"),
        activation=activation,
    )
    return load_weights(cfg, sd)


def load_weights(cfg: CLIPConfig, sd: dict, source: str = "the state dict") -> CLIP:
    """A CLIP of the sizes in cfg holding the tensors of sd (our names): every tensor there,
    of the right shape, and nothing else, or one CLIPLoadError that lists what is wrong."""
    # Built on the meta device (no memory, no random init: the weights are about to be
    # replaced), then fp32 copies of the checkpoint's tensors become the parameters. The
    # copy keeps the model from sharing storage with the caller's state dict; fp16
    # releases become fp32 (autocast gives the speed back on a GPU).
    sd = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        model = CLIP(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in want if k not in sd] + [f"unexpected {k}" for k in sd if k not in want]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {want[k]}" for k in want
                 if k in sd and tuple(sd[k].shape) != want[k]]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise CLIPLoadError(f"{source} does not fit a CLIP of the sizes it implies ({cfg}): "
                            f"{'; '.join(problems[:4])}{more}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------
# 5. load(): OpenAI's released checkpoints or a file, plus CLIP's preprocessing
# ----------------------------------------------------------------------------------------

# The SHA-256 of each file is the second-to-last part of its address.
_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/"
                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
}


def available_models() -> list[str]:
    return list(_MODELS)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, root: Path) -> Path:
    """Fetch a released checkpoint into `root` (progress bar, SHA-256 checked), or explain
    in one paragraph which file to pass when the machine cannot reach the address."""
    from tqdm import tqdm

    url = _MODELS[name]
    expected, filename = url.split("/")[-2], url.split("/")[-1]
    target = root / filename
    if target.is_file() and _sha256(target) == expected:
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as src, open(partial, "wb") as dst, \
                tqdm(total=int(src.headers.get("Content-Length", 0)), unit="B", unit_scale=True,
                     desc=filename) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        partial.unlink(missing_ok=True)
        raise CLIPLoadError(
            f"could not download CLIP {name} ({e}). This machine seems to be offline. Download "
            f"{url} (the file {filename}) on a machine with internet access, copy it here, and "
            f"pass its path instead of the name, e.g. load('/path/to/{filename}') or "
            f"`--clip /path/to/{filename}`; or put it at {target}.") from None
    if _sha256(partial) != expected:
        partial.unlink(missing_ok=True)
        raise CLIPLoadError(f"the download of {filename} is corrupt (SHA-256 mismatch); try again")
    os.replace(partial, target)  # only a verified file ever takes the final name
    return target


def _to_rgb(image):
    return image.convert("RGB")


def preprocess_for(resolution: int):
    """CLIP's preprocessing: bicubic resize of the short side, center crop, RGB, CLIP's mean/std."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(resolution),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def load(name_or_path: str | Path, device: str | torch.device = "cpu", download_root: str | Path | None = None,
         activation: str | None = None, trust_torchscript: bool = False):
    """-> (model, preprocess). A released name ('ViT-B/16', 'ViT-B/32', 'ViT-L/14') is
    downloaded once into download_root (default ~/.cache/clip) and checked against its
    SHA-256. A path may be a Hugging Face CLIP folder (config.json + model.safetensors), a
    state dict in OpenAI's names (.pt, .bin, .safetensors), or a TorchScript archive: one of
    OpenAI's releases (by SHA-256), or any with trust_torchscript=True (see read_weights).

    activation: "quick_gelu" or "gelu"; None takes what the file says (a Hugging Face
    config.json, a .safetensors written by save_safetensors), else "quick_gelu" (OpenAI's).
    A value that contradicts the file is refused. The model comes back in fp32, in eval mode."""
    if activation is not None and activation not in ACTIVATIONS:
        raise CLIPLoadError(f"unknown activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    if str(name_or_path) in _MODELS:  # _download checked its SHA-256: a release, trusted as such
        path = _download(str(name_or_path), Path(download_root or Path.home() / ".cache" / "clip"))
        trust_torchscript = True
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise CLIPLoadError(f"no CLIP checkpoint at {path}: pass one of {', '.join(_MODELS)}, the path of a "
                                f"checkpoint file (e.g. ViT-B-16.pt) or a Hugging Face CLIP folder")
    sd, cfg, stated = read_weights(path, trust_torchscript)
    if stated is not None and activation is not None and stated != activation:
        raise CLIPLoadError(f"{path} says its activation is {stated}; the activation asked for ({activation}, "
                            f"--clip-activation) contradicts it: leave it out")
    activation = stated or activation or "quick_gelu"
    model = build_model(sd, activation) if cfg is None else load_weights(
        dataclasses.replace(cfg, activation=activation), sd, str(path))
    return model.float().to(device), preprocess_for(model.visual.input_resolution)


# ----------------------------------------------------------------------------------------
# 6. Weights as users hold them: state dicts in OpenAI's names (.pt, .bin, .safetensors),
#    Hugging Face transformers folders, and TorchScript archives only when trusted
# ----------------------------------------------------------------------------------------

_RELEASED_SHA256 = {url.split("/")[-2] for url in _MODELS.values()}


def read_weights(path: Path, trust_torchscript: bool = False) -> tuple[dict, CLIPConfig | None, str | None]:
    """-> (state dict in our names, the sizes a Hugging Face config.json gives or None, the
    activation the file states or None).

    What reading trusts: a state dict is read with weights_only=True or from .safetensors
    (tensors only: it cannot run code). torch has no weights-only reader for TorchScript
    archives: torch.jit.load compiles the TorchScript code inside. So an archive is read only
    when its SHA-256 is one of OpenAI's releases or trust_torchscript is set; convert a
    trusted one once with save_safetensors (lpi.py --convert-clip) and later runs trust nothing."""
    if path.is_dir():
        return _read_hf_folder(path)
    if _is_torchscript(path):
        if not trust_torchscript and _sha256(path) not in _RELEASED_SHA256:
            raise CLIPLoadError(f"{path} is a TorchScript archive that is not one of OpenAI's releases (by SHA-256): "
                                f"reading it would compile the code inside it. Pass --trust-torchscript "
                                f"(trust_torchscript=True) only if you trust its source, and convert it once to a "
                                f".safetensors file (lpi.py --convert-clip) so that later runs need no trust")
        return torch.jit.load(str(path), map_location="cpu").state_dict(), None, None
    sd, metadata = _read_tensors(path)
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):  # a transformers model.safetensors
        if not (path.parent / "config.json").is_file():
            raise CLIPLoadError(f"{path} holds a Hugging Face CLIP's tensors, but there is no config.json beside it "
                                f"(it says the activation and the sizes)")
        cfg = _hf_config(path.parent)
        return from_hf_state_dict(sd), cfg, cfg.activation
    return sd, None, metadata.get("activation")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with the scripted code (code/, constants.pkl);
    torch.save's zip files have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def _read_tensors(path: Path) -> tuple[dict, dict]:
    """A state dict and its metadata, from .safetensors or a torch.save'd file (read with
    weights_only=True); a training checkpoint {"state_dict": ...} gives its state dict."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CLIPLoadError(f"cannot read {path} as .safetensors (truncated or corrupt download?): {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or not a torch file at all
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CLIPLoadError(f"cannot read {path}: it is neither a TorchScript archive nor a torch state dict "
                            f"(truncated or corrupt download?). Detail: {detail}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIPLoadError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return obj, {}


def save_safetensors(model: CLIP, path: str | Path) -> None:
    """The model as a .safetensors state dict in OpenAI's names that records its activation:
    what load() reads back without trusting anything."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "activation": model.cfg.activation})


# Hugging Face transformers' CLIPModel: its names onto ours (OpenAI's), in one table. Per
# block, q, k and v are three Linear layers there and one stacked in_proj here (as in
# nn.MultiheadAttention); the two projections are Linear weights (E, W) there, (W, E) here.
_HF_TOWERS = {"vision_model.encoder.layers": "visual.transformer.resblocks",
              "text_model.encoder.layers": "transformer.resblocks"}
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_NAMES = {"logit_scale": "logit_scale",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm": "ln_final",
             "vision_model.embeddings.class_embedding": "visual.class_embedding",
             "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
             "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
             "vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post"}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_HF_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _hf_name(key: str) -> str | None:
    """Our name of a transformers CLIPModel tensor; None for q / k / v (stacked apart). A name
    without a counterpart stays as it is, so that load_weights reports it as unexpected."""
    module, _, part = key.rpartition(".")
    for theirs, ours in _HF_TOWERS.items():
        if key.startswith(theirs + "."):
            i, _, module = module[len(theirs) + 1:].partition(".")
            return None if module in _HF_QKV else f"{ours}.{i}.{_HF_BLOCK.get(module, module)}.{part}"
    if key in _HF_NAMES:
        return _HF_NAMES[key]
    return f"{_HF_NAMES[module]}.{part}" if module in _HF_NAMES else _HF_TRANSPOSED.get(key, key)


def from_hf_state_dict(hf: dict) -> dict:
    """A transformers CLIPModel state dict -> ours (a q, k or v missing leaves in_proj missing)."""
    sd = {_hf_name(k): v.t() if k in _HF_TRANSPOSED else v for k, v in hf.items() if k not in _HF_BUFFERS}
    sd.pop(None, None)
    for theirs, ours in _HF_TOWERS.items():
        for i in {k[len(theirs) + 1:].split(".")[0] for k in hf if k.startswith(theirs + ".")}:
            for part in ("weight", "bias"):
                qkv = [hf.get(f"{theirs}.{i}.{m}.{part}") for m in _HF_QKV]
                if all(t is not None for t in qkv) and len({t.shape[1:] for t in qkv}) == 1:
                    sd[f"{ours}.{i}.attn.in_proj_{part}"] = torch.cat(qkv)     # (3W, W) / (3W,)
    return sd


# transformers' defaults, which save_pretrained leaves out of config.json.
_HF_DEFAULTS = {"text": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5),
                "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)}


def _hf_config(folder: Path) -> CLIPConfig:
    """The sizes and the activation of a transformers CLIP, from its config.json; what our
    blocks cannot be (heads other than 64 wide, another MLP ratio or LayerNorm eps) is refused."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIPLoadError(f"{path} is not a readable JSON file ({e})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "clip":
        kind = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CLIPLoadError(f"{path} describes a {kind!r} model, not a CLIP (model_type 'clip')")
    towers = {t: dict(_HF_DEFAULTS[t], **(raw.get(f"{t}_config") or {})) for t in _HF_DEFAULTS}
    activations = {c["hidden_act"] for c in towers.values()}
    if len(activations) > 1 or not activations <= set(ACTIVATIONS):
        raise CLIPLoadError(f"{path}: hidden_act {' / '.join(sorted(activations))}; expected one of "
                            f"{', '.join(ACTIVATIONS)}, the same in both towers")
    for name, c in towers.items():
        if (c["hidden_size"] != 64 * c["num_attention_heads"] or c["intermediate_size"] != 4 * c["hidden_size"]
                or c["layer_norm_eps"] != 1e-5):
            raise CLIPLoadError(f"{path}: the {name} tower has heads {c['hidden_size'] // c['num_attention_heads']} "
                                f"wide, an MLP of {c['intermediate_size']} for width {c['hidden_size']} and LayerNorm eps "
                                f"{c['layer_norm_eps']}; this CLIP has 64-wide heads, a 4x MLP and eps 1e-5")
    text, vision = towers["text"], towers["vision"]
    return CLIPConfig(embed_dim=raw.get("projection_dim", 512), image_resolution=vision["image_size"],
                      vision_layers=vision["num_hidden_layers"], vision_width=vision["hidden_size"],
                      vision_patch_size=vision["patch_size"], context_length=text["max_position_embeddings"],
                      vocab_size=text["vocab_size"], transformer_width=text["hidden_size"],
                      transformer_layers=text["num_hidden_layers"], activation=activations.pop())


def _read_hf_folder(folder: Path) -> tuple[dict, CLIPConfig, str]:
    """A transformers CLIP folder: config.json and model.safetensors (or pytorch_model.bin)."""
    if not (folder / "config.json").is_file():
        raise CLIPLoadError(f"{folder} is a folder without config.json: a Hugging Face CLIP folder holds "
                            f"config.json and model.safetensors")
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise CLIPLoadError(f"{folder} has a config.json but no model.safetensors (or pytorch_model.bin)")
    cfg = _hf_config(folder)
    return from_hf_state_dict(_read_tensors(weights)[0]), cfg, cfg.activation
