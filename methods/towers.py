"""What the two open_clip towers compute besides the pooled feature, in the same forward pass: the vision
tower's patch embeddings (MSG-CLIP's image-side entities) and the text tower's token states (SmartCLIP's
mask network input). Each function reproduces open_clip's own `encode_image` / `encode_text` for the pooled
feature (tests/test_msgclip.py checks the equality), so a method that needs tokens pays no second pass.
"""
from __future__ import annotations

from open_clip.transformer import text_global_pool
from torch import Tensor, nn


def check_patch_tokens(visual: nn.Module) -> None:
    """Fail at once, naming the reason, when the vision tower has no per-patch tokens in a fixed grid."""
    needed = ("_embeds", "_pool", "transformer", "ln_post", "proj", "grid_size")
    missing = [a for a in needed if not hasattr(visual, a)]
    if missing:
        raise ValueError(f"patch tokens need an open_clip VisionTransformer; {type(visual).__name__} lacks "
                         f"{', '.join(missing)}")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("patch tokens: the vision tower pools with attention queries, so its tokens are not patches")
    dropout = getattr(getattr(visual, "patch_dropout", None), "prob", 0.0)
    if dropout:
        raise ValueError(f"patch tokens: patch dropout ({dropout}) drops patches, so regions cannot be located; "
                         "set the model's patch_dropout to 0")


def encode_image_tokens(visual: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(pooled (B, D), patches (B, P, D)), both unnormalised: every patch token goes through CLIP's own
    `ln_post` and `proj`, like the pooled token, so patches live in the joint embedding space (MaskCLIP's
    observation; no new parameter). Patches are in row-major grid order (row * grid_w + column)."""
    x = visual.transformer(visual._embeds(images))  # (B, 1 + P, W)
    pooled, tokens = visual._pool(x)  # (B, W), (B, P, W); ln_post already applied unless after-pool
    if getattr(visual, "final_ln_after_pool", False):
        tokens = visual.ln_post(tokens)
    return pooled @ visual.proj, tokens @ visual.proj  # (B, W) @ (W, D) -> (B, D); (B, P, W) @ (W, D) -> (B, P, D)


def exact_trim(model: nn.Module) -> bool:
    """Whether dropping padding columns leaves the text features unchanged: a causal mask (a token never
    attends to later ones) and pooling at the end-of-text token (the highest id)."""
    return getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", "") == "argmax"


def encode_text_tokens(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(features (B, D) unnormalised, token states after `ln_final` (B, L, W)) of open_clip's text tower, for
    tokens of any length up to the context (the loader cuts them after the batch's longest text where
    `exact_trim` holds: datamodules.datamodule.trim_caption_tokens)."""
    if not hasattr(model, "token_embedding"):
        raise ValueError(f"text token states need open_clip's built-in text tower; {type(model).__name__} has another")
    length = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast)  # (B, L, W)
    x = x + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))  # (B, L, W)
    pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))  # (B, W)
    proj = model.text_projection
    features = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, W) @ (W, D) -> (B, D)
    return features, x
