"""Masked autoencoders (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners")
for our ViTs and PiTs.

The encoder is the registry's timm VisionTransformer itself, unchanged: `mae.encoder` is
that model, so `mae.encoder.state_dict()` loads with strict=True into a freshly built
registry model and every probe runs on it. MAE only changes which tokens the encoder sees:

    patch_embed -> + pos_embed of the patch tokens -> keep the visible tokens
    -> prepend [cls] (+ its pos_embed row) -> pos_drop, norm_pre -> blocks -> norm

The light decoder is MAE's: a linear map to the decoder width, a shared learned mask
token in every masked slot, its own position embedding (fixed 2-D sin-cos by default,
prefix rows zero), a few timm Blocks, a LayerNorm and a linear prediction of the
patch_size * patch_size * in_chans values of each token. The loss is the mean squared
error over masked tokens only.

Defaults, chosen for 8x8 to 64x64 images rather than ImageNet: MAE's 512-wide, 8-deep
decoder would be larger than a pit-t encoder. `decoder_dim = min(encoder width, 128)`
(64 for the nano width, 128 for t/s/b), `decoder_depth = 2`, `decoder_heads =
decoder_dim // 32` (MAE's 32 channels per head), mask ratio 0.75 (MAE's).
`norm_pix_loss` (MAE's per-token normalised targets) defaults to None = automatic: on
for a ViT, whose token is a patch of several pixels (MAE's setting), off for a PiT, whose
token is one pixel: normalising a pixel's in_chans values over themselves keeps only the
direction of its colour (and blows up the quantisation noise of grey pixels), and for a
grey image leaves nothing at all, so norm_pix_loss=True on a one-value token is refused.
`options()` records the resolved value.

A checkpoint of an MAE run keeps the usual keys (`model_spec`, `model_state` = the
encoder's state dict, `data`, ...) plus `mae_options` (`MaskedAutoencoder.options()`, a
plain dict) and `mae_state` (`decoder_state_dict()`: every entry of `mae.state_dict()`
outside `encoder.`). `mae_from_checkpoint` rebuilds the whole autoencoder from them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.pos_embed import sincos_2d
from localitylab.models.registry import ModelSpec, build_model, model_kind

MAE_KINDS = ("pit", "vit")
DECODER_POS_EMBEDS = ("sincos", "learn")
DEFAULT_MASK_RATIO = 0.75
DEFAULT_DECODER_DEPTH = 2
MAX_DEFAULT_DECODER_DIM = 128
CHANNELS_PER_HEAD = 32
NORM_PIX_EPS = 1e-6


# --- masking ----------------------------------------------------------------------------------

def masked_count(num_tokens: int, mask_ratio: float) -> int:
    """How many of `num_tokens` tokens a ratio masks: round(mask_ratio * num_tokens)."""
    return int(round(mask_ratio * num_tokens))


def check_mask_ratio(mask_ratio: float, num_tokens: int) -> None:
    """UserError unless 0 < ratio < 1 masks at least one token and leaves at least one visible."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real) or not 0 < mask_ratio < 1:
        raise UserError(f"mask ratio must be a number strictly between 0 and 1, got {mask_ratio!r}")
    masked = masked_count(num_tokens, mask_ratio)
    if masked >= num_tokens:
        raise UserError(f"mask ratio {mask_ratio} masks all {num_tokens} tokens; the encoder needs at least "
                        f"one visible token (use a ratio of at most {(num_tokens - 1) / num_tokens:.4g})")
    if masked < 1:
        raise UserError(f"mask ratio {mask_ratio} masks no token of {num_tokens}; the loss needs at least one "
                        f"(use a ratio of at least {1 / num_tokens:.4g})")


def random_masking(batch_size: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random set of exactly round(mask_ratio * num_tokens) masked tokens per image.

    Returns `keep_idx` (B, N_visible) int64, the visible token indices in increasing order,
    and `mask` (B, N) bool, True where a token is masked. The sets come from an argsort of
    uniform noise drawn from `generator` (on the generator's own device, so a seed gives
    the same masks on every device); None uses torch's global generator.
    """
    check_mask_ratio(mask_ratio, num_tokens)
    keep = num_tokens - masked_count(num_tokens, mask_ratio)
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=noise_device)
    keep_idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    keep_idx = keep_idx.to(device) if device is not None else keep_idx
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=keep_idx.device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


# --- tokens <-> images --------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): tokens in row-major grid order (timm's), values (row, col, channel)."""
    batch, chans, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"{height}x{width} images do not split into {patch_size}x{patch_size} patches")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, chans, rows, patch_size, cols, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, row, col, p, q, c
    return x.reshape(batch, rows * cols, patch_size * patch_size * chans)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, p*p*C) -> (B, C, rows*p, cols*p)."""
    batch = tokens.shape[0]
    rows, cols = grid
    x = tokens.reshape(batch, rows, cols, patch_size, patch_size, in_chans)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, row, p, col, q
    return x.reshape(batch, in_chans, rows * patch_size, cols * patch_size)


# --- the model ----------------------------------------------------------------------------------

class MAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: mean squared error over masked tokens
    pred: torch.Tensor  # (B, N, p*p*C): the decoder's prediction for every token (normalised if norm_pix_loss)
    mask: torch.Tensor  # (B, N) bool, True where masked


@dataclass(frozen=True)
class MAEReconstruction:
    """Images (B, C, H, W) in the encoder's input space (normalised), for figures.

    Unpacks as `masked_input, reconstruction, original`; `pixel_mask` (B, 1, H, W) bool
    says which pixels were masked.
    """

    masked_input: torch.Tensor  # the original with masked pixels set to 0 (the data set mean once normalised)
    reconstruction: torch.Tensor  # the prediction on masked tokens, the original pasted on visible ones
    original: torch.Tensor
    pixel_mask: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.masked_input, self.reconstruction, self.original))


def default_decoder_dim(encoder_dim: int) -> int:
    return min(encoder_dim, MAX_DEFAULT_DECODER_DIM)


def default_decoder_heads(decoder_dim: int) -> int:
    return max(1, decoder_dim // CHANNELS_PER_HEAD)


def transformer_reason(encoder: nn.Module) -> str | None:
    """Why `encoder` cannot be an MAE encoder, or None (it needs timm ViT parts)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(encoder, VisionTransformer):
        return f"MAE needs a transformer (pit-* or vit-*/P), got a {type(encoder).__name__}"
    if getattr(encoder, "attn_pool", None) is not None:
        return "MAE needs a ViT whose features are tokens; this one pools with attention inside forward_features"
    if len(getattr(encoder.patch_embed, "grid_size", ())) != 2:
        return "MAE needs a ViT with a fixed 2-D token grid"
    return None


class MaskedAutoencoder(nn.Module):
    """MAE around a timm VisionTransformer (`encoder`, kept as is) with a small decoder."""

    def __init__(self, encoder: nn.Module, mask_ratio: float = DEFAULT_MASK_RATIO, decoder_dim: int | None = None,
                 decoder_depth: int | None = None, decoder_heads: int | None = None,
                 decoder_mlp_ratio: float = 4.0, decoder_pos_embed: str = "sincos",
                 norm_pix_loss: bool | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        reason = transformer_reason(encoder)
        if reason:
            raise UserError(reason)
        self.encoder = encoder
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        if tuple(encoder.patch_embed.patch_size) != (self.patch_size, self.patch_size):
            raise UserError(f"MAE needs square patches, got {tuple(encoder.patch_embed.patch_size)}")
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.in_chans = int(encoder.patch_embed.proj.in_channels)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = int(encoder.num_prefix_tokens)
        self.token_values = self.patch_size * self.patch_size * self.in_chans
        encoder_dim = int(encoder.embed_dim)

        # None means the default, so callers can pass through unset options.
        decoder_dim = default_decoder_dim(encoder_dim) if decoder_dim is None else decoder_dim
        decoder_depth = DEFAULT_DECODER_DEPTH if decoder_depth is None else decoder_depth
        decoder_heads = default_decoder_heads(decoder_dim) if decoder_heads is None else decoder_heads
        for label, value in (("decoder_dim", decoder_dim), ("decoder_depth", decoder_depth),
                             ("decoder_heads", decoder_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"MAE {label} must be a whole number >= 1, got {value!r}")
        if decoder_dim % decoder_heads:
            raise UserError(f"MAE decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        if decoder_pos_embed not in DECODER_POS_EMBEDS:
            raise UserError(f"unknown MAE decoder_pos_embed {decoder_pos_embed!r}; valid: "
                            f"{', '.join(DECODER_POS_EMBEDS)}")
        if decoder_pos_embed == "sincos" and decoder_dim % 4:
            raise UserError(f"a sin-cos decoder position embedding needs decoder_dim divisible by 4, got {decoder_dim}")
        if norm_pix_loss is None:
            norm_pix_loss = self.patch_size > 1
        if norm_pix_loss and self.token_values < 2:
            raise UserError(f"norm_pix_loss normalises each token over its values, and a token of this model holds "
                            f"only {self.token_values} (patch {self.patch_size}, {self.in_chans} channel); "
                            f"use norm_pix_loss=False")
        check_mask_ratio(mask_ratio, self.num_tokens)
        self.mask_ratio = float(mask_ratio)
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.decoder_mlp_ratio = float(decoder_mlp_ratio)
        self.decoder_pos_embed_kind = decoder_pos_embed
        self.norm_pix_loss = bool(norm_pix_loss)

        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_tokens, decoder_dim),
                                              requires_grad=decoder_pos_embed == "learn")
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=self.decoder_mlp_ratio, qkv_bias=True)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.token_values)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # MAE's initialisation, applied to the decoder only (the encoder keeps the registry's).
        with torch.no_grad():
            if self.decoder_pos_embed_kind == "sincos":
                self.decoder_pos_embed[0, self.num_prefix_tokens:] = sincos_2d(self.decoder_dim, *self.grid)
            else:
                nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # --- plain-dict state, for checkpoints ------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The constructor's options as a plain dict: `MaskedAutoencoder(encoder, **mae.options())`."""
        return {
            "mask_ratio": self.mask_ratio, "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
            "decoder_heads": self.decoder_heads, "decoder_mlp_ratio": self.decoder_mlp_ratio,
            "decoder_pos_embed": self.decoder_pos_embed_kind, "norm_pix_loss": self.norm_pix_loss,
        }

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Every entry of `state_dict()` outside the encoder (decoder and mask token)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_decoder_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what `decoder_state_dict()` returned, strictly (every key, nothing else)."""
        stray = sorted(k for k in state if k.startswith("encoder."))
        if stray:
            raise UserError(f"MAE decoder state holds encoder weights ({stray[0]!r}); save those as model_state")
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            what = f"no {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise UserError(f"MAE decoder state does not fit these options: {what}")

    # --- the passes ---------------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.patch_size, self.grid, self.in_chans)

    def forward_encoder(self, images: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, N_visible) -> (B, prefix + N_visible, D): the encoder over visible tokens only.

        timm's forward_features with a gather after the position embedding; its patch_drop
        is left out (the masking does that job).
        """
        encoder = self.encoder
        x = encoder.patch_embed(images)
        if x.dim() == 4:  # dynamic_img_size ViTs embed to NHWC
            x = x.flatten(1, 2)
        prefix_pos = None
        if encoder.pos_embed is not None:
            pos = encoder.pos_embed
            if not encoder.no_embed_class:
                prefix_pos, pos = pos[:, :self.num_prefix_tokens], pos[:, self.num_prefix_tokens:]
            x = x + pos
        x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        prefix_params = (encoder.cls_token, getattr(encoder, "reg_token", None))
        prefix = [t.expand(x.shape[0], -1, -1) for t in prefix_params if t is not None]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if prefix_pos is not None:
                prefix_tokens = prefix_tokens + prefix_pos
            x = torch.cat([prefix_tokens, x], dim=1)
        x = encoder.pos_drop(x)
        x = encoder.norm_pre(x)
        if encoder.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(encoder.blocks, x)
        else:
            x = encoder.blocks(x)
        return encoder.norm(x)

    def forward_decoder(self, latent: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Encoder output over visible tokens -> (B, N, p*p*C) predictions for every token."""
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        tokens = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_tokens, -1)
        tokens = tokens.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), visible)
        x = torch.cat([prefix, tokens], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix_tokens:])

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: the tokens' values, normalised per token if norm_pix_loss."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        return target

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per token, averaged over masked tokens only."""
        per_token = (pred.float() - self.target(images).float()).pow(2).mean(dim=-1)
        weights = mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum()

    def draw_mask(self, batch_size: int, generator: torch.Generator | None,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        return random_masking(batch_size, self.num_tokens, self.mask_ratio, generator, device)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MAEOutput:
        """Mask a fresh random set of tokens per image, encode the rest, predict every token."""
        expected = (self.in_chans, self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(f"MAE takes images of shape (B, {', '.join(map(str, expected))}), "
                            f"got {tuple(images.shape)}")
        keep_idx, mask = self.draw_mask(images.shape[0], generator, images.device)
        pred = self.forward_decoder(self.forward_encoder(images, keep_idx), keep_idx)
        return MAEOutput(self.loss(images, pred, mask), pred, mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MAEReconstruction:
        """Masked input, reconstruction (visible tokens pasted from the input) and original, as images.

        With norm_pix_loss the prediction is mapped back with each token's own mean and
        variance from the original, as in MAE's figures.
        """
        output = self.forward(images, generator)
        pred = output.pred.float()
        tokens = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = tokens.mean(dim=-1, keepdim=True)
            std = (tokens.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
            pred = pred * std + mean
        token_mask = output.mask.unsqueeze(-1)
        reconstruction = self.unpatchify(torch.where(token_mask, pred, tokens))
        masked_input = self.unpatchify(tokens.masked_fill(token_mask, 0.0))
        pixel_mask = self.unpatchify(token_mask.expand(-1, -1, self.token_values).float())[:, :1] > 0.5
        return MAEReconstruction(masked_input, reconstruction, images.float(), pixel_mask)


# --- building and loading -----------------------------------------------------------------------

def _check_kind(spec: ModelSpec) -> None:
    kind = model_kind(spec.name)
    if kind not in MAE_KINDS:
        raise UserError(f"MAE needs a transformer (pit-* or vit-*/P); {spec.name} is a {kind} model")


def build_mae(spec: ModelSpec, **options: Any) -> MaskedAutoencoder:
    """A fresh MAE whose encoder is `build_model(spec)` (pit/vit only)."""
    _check_kind(spec)
    return _construct(build_model(spec), options)


def _construct(encoder: nn.Module, options: dict[str, Any]) -> MaskedAutoencoder:
    import inspect

    valid = [p for p in inspect.signature(MaskedAutoencoder.__init__).parameters if p not in ("self", "encoder")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"unknown MAE option {unknown[0]!r}; valid: {', '.join(valid)}")
    return MaskedAutoencoder(encoder, **options)


def mae_from_encoder(encoder: nn.Module, options: dict[str, Any], state: dict[str, torch.Tensor]) -> MaskedAutoencoder:
    """An MAE around an already loaded encoder (kept as is), with its decoder from `mae_state`,
    on the encoder's device."""
    mae = _construct(encoder, dict(options))
    mae.to(next(encoder.parameters()).device)  # the encoder is there already: only the decoder moves
    mae.load_decoder_state_dict(state)
    return mae


def is_mae_checkpoint(data: dict[str, Any]) -> bool:
    return isinstance(data.get("mae_options"), dict) and isinstance(data.get("mae_state"), dict)


def mae_from_checkpoint(data: dict[str, Any]) -> MaskedAutoencoder:
    """Rebuild an MAE (on the CPU) from a checkpoint dict.

    Keys used: 'model_spec' (ModelSpec.to_dict()), 'model_state' (the encoder's state
    dict), 'mae_options' (MaskedAutoencoder.options()), 'mae_state' (decoder_state_dict()).
    """
    for key in ("model_spec", "model_state", "mae_options", "mae_state"):
        if key not in data:
            raise UserError(f"not an MAE checkpoint: no {key!r}")
    spec = ModelSpec.from_dict(data["model_spec"])
    _check_kind(spec)
    encoder = build_model(spec)
    try:
        encoder.load_state_dict(data["model_state"])
    except RuntimeError as err:
        raise UserError(f"encoder weights do not fit {spec.name}: {str(err).splitlines()[0]}") from None
    return mae_from_encoder(encoder, data["mae_options"], data["mae_state"])


def mask_ratio_note(mae: MaskedAutoencoder) -> str:
    masked = masked_count(mae.num_tokens, mae.mask_ratio)
    return f"{masked} of {mae.num_tokens} tokens masked (ratio {mae.mask_ratio:g})"


__all__ = [
    "MAEOutput", "MaskedAutoencoder", "MAEReconstruction", "build_mae", "check_mask_ratio", "is_mae_checkpoint",
    "mae_from_checkpoint", "mae_from_encoder", "masked_count", "patchify", "random_masking", "unpatchify",
]
