"""Class-conditional diffusion transformers (DiT, Peebles & Xie 2023), any patch size.

`dit-{n,s,b,l,xl}/P` is diffusers' `DiTTransformer2DModel` (adaLN-Zero blocks, the DiT
paper's architecture) on the data set's own pixels: with P = 1 every pixel is a token, the
generative analogue of a PiT (the PiT paper's DiT-L/1 against DiT-L/2).

What diffusers' class does not do for training from scratch, and is done here:

- **One conditioning embedder.** The DiT paper embeds the timestep and the label once and
  feeds the same vector to every block's adaLN; diffusers' class builds a separate
  timestep + label embedder inside every block (and its final layer reads block 0's). Here
  every block shares block 0's embedder, which is the paper's model and its parameter count.
- **Label dropout outside the model.** diffusers' `LabelEmbedding` drops labels with the
  global random generator, once per call, that is independently in every block: block 0
  could see the null label while block 1 sees the true one. Classifier-free guidance needs
  one decision per image, drawn from the batch's own generator (so a resumed run draws the
  same), so the objective (`localitylab.diffusion.objective`) replaces dropped labels by
  the null class `num_classes` before the forward pass and the model never drops any.
- **The DiT initialisation.** diffusers leaves PyTorch's default initialisation (its weights
  are meant to be loaded); adaLN-Zero means the modulation and the output layers start at
  zero, so that every block starts as the identity. `_initialise_like_dit` follows the DiT
  paper's `initialize_weights`.
- **`pos_embed learn | sincos | none`.** diffusers builds the fixed sin-cos table (DiT's
  default, kept as `sincos`); `learn` replaces it by a trained table initialised at the
  same scale as the ViTs' (`pos_embed.POS_EMBED_STD`, timm's 0.02), `none` removes it.

The model predicts the noise only (DiT's `learn_sigma=False`): the fast deterministic
samplers used here (DDIM, DPM-Solver) never read a learned variance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.pos_embed import token_options
from localitylab.models.registry import parse_model_name, register_model
from localitylab.models.spec import ModelSpec

# The DiT paper's Table 1 (S, B, L, XL); n (nano) is ours, for tests and CPU runs.
WIDTHS = {
    "n": dict(width=64, depth=4, heads=4),
    "s": dict(width=384, depth=12, heads=6),
    "b": dict(width=768, depth=12, heads=12),
    "l": dict(width=1024, depth=24, heads=16),
    "xl": dict(width=1152, depth=28, heads=16),
}
DEFAULT_POS_EMBED = "sincos"  # DiT's fixed table


class DiffusionTransformer(nn.Module):
    """A class-conditional DiT that predicts the noise: `model(x_t, t, labels) -> eps`.

    `x_t` is a float image batch (B, C, H, W) on the diffusion scale ([-1, 1] plus noise), `t`
    the integer timesteps (B,), `labels` the classes (B,), where `null_class` (= num_classes)
    is the unconditional label of classifier-free guidance.
    """

    def __init__(self, img_size: int, in_chans: int, num_classes: int, patch_size: int, width: int, depth: int,
                 heads: int, pos_embed: str = DEFAULT_POS_EMBED, pos_embed_std: float = 1.0) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 0  # every token is a patch (pixel) token
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=in_chans,
            out_channels=in_chans,
            num_layers=depth,
            sample_size=img_size,
            patch_size=patch_size,
            num_embeds_ada_norm=num_classes,  # diffusers' name for the number of classes
        )
        blocks = self.transformer.transformer_blocks
        shared = blocks[0].norm1.emb
        for block in blocks[1:]:
            block.norm1.emb = shared
        # One extra embedding row (the null class) exists because the dropout probability was
        # positive at construction; zero it so the model itself never drops a label.
        shared.class_embedder.dropout_prob = 0.0
        self.null_class = num_classes
        _initialise_like_dit(self.transformer)
        self._set_pos_embed(pos_embed, pos_embed_std)

    def _set_pos_embed(self, kind: str, std: float) -> None:
        patch_embed = self.transformer.pos_embed
        if kind == "sincos":
            return  # diffusers' buffer: DiT's fixed 2-D sin-cos table, rebuilt on construction
        table = patch_embed.pos_embed
        del patch_embed._buffers["pos_embed"]
        if kind == "none":
            patch_embed.pos_embed = None
        else:  # learn
            learned = nn.Parameter(torch.empty_like(table))
            nn.init.trunc_normal_(learned, std=std, a=-2 * std, b=2 * std)
            patch_embed.pos_embed = learned

    @property
    def pos_embed(self) -> torch.Tensor | None:
        """The (1, tokens, width) position table added to the tokens, or None."""
        return self.transformer.pos_embed.pos_embed

    @property
    def pos_embed_kind(self) -> str:
        table = self.pos_embed
        if table is None:
            return "none"
        return "learn" if isinstance(table, nn.Parameter) else "sincos"

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    def example_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, timesteps, labels) for a forward pass on `images` (FLOP counts, shapes)."""
        zeros = torch.zeros(len(images), dtype=torch.long, device=images.device)
        return images, zeros, zeros

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(noisy, timestep=timesteps, class_labels=labels, return_dict=False)[0]


@torch.no_grad()
def _initialise_like_dit(model: nn.Module) -> None:
    """The DiT paper's initialisation (its `initialize_weights`), on diffusers' module names."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for block in model.transformer_blocks:
        # DiT's attention has one fused qkv Linear(width, 3 width); diffusers splits it into
        # three. Use the fused layer's Xavier bound so the initial attention matches DiT's.
        attn = block.attn1
        width = attn.to_q.in_features
        bound = math.sqrt(6.0 / (width + 3 * width))
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(block.norm1.linear.bias)
    proj = model.pos_embed.proj  # the patch embedding, initialised like a Linear layer
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    embedder = model.transformer_blocks[0].norm1.emb
    nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
    for layer in (model.proj_out_1, model.proj_out_2):  # the final layer starts at zero
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_dit(spec: ModelSpec, size: str, patch_size: int) -> DiffusionTransformer:
    pos_embed, pos_embed_std, extra = token_options(spec, patch_size, DEFAULT_POS_EMBED)
    dims = dict(WIDTHS[size])
    for key in list(extra):
        if key not in dims:
            raise UserError(f"{spec.name}: unknown model_kw {key!r}; valid: {', '.join([*dims, 'pos_embed_std'])}",
                            setting="model_kw")
        try:
            dims[key] = int(extra.pop(key))
        except (TypeError, ValueError):
            raise UserError(f"{spec.name}: model_kw {key} must be an integer", setting="model_kw") from None
    if min(dims.values()) < 1 or dims["width"] % dims["heads"]:
        raise UserError(f"{spec.name}: width {dims['width']} must be a positive multiple of heads {dims['heads']}, "
                        f"and depth at least 1")
    return DiffusionTransformer(spec.img_size, spec.in_chans, spec.num_classes, patch_size, dims["width"],
                                dims["depth"], dims["heads"], pos_embed, pos_embed_std)


def _register(size: str) -> None:
    dims = WIDTHS[size]
    desc = f"width {dims['width']}, {dims['depth']} blocks, {dims['heads']} heads"

    @register_model(f"dit-{size}", kind="dit", summary=f"class-conditional diffusion transformer (DiT), PxP tokens; "
                                                       f"{desc}", takes_patch=True, example_patch=2,
                    pos_embed=DEFAULT_POS_EMBED)
    def _dit(spec: ModelSpec) -> nn.Module:
        _, patch = parse_model_name(spec.name)
        return build_dit(spec, size, patch)


for _size in WIDTHS:
    _register(_size)
