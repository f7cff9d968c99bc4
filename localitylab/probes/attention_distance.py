"""attention-distance: how far, in input pixels, each head of each layer looks (PROBES.md).

The ViT paper's "mean attention distance" (Dosovitskiy et al. 2021, Fig. 7; Raghu et al.
2021), made comparable across patch sizes by measuring in pixels between token centres and
by dividing by the same quantity for uniform attention (`locality_ratio`).

The attention is exactly the model's: forward pre-hooks on every timm `Attention` module
recompute q and k the way the module does (qkv projection, q_norm / k_norm, scale, mask)
and reduce the softmax over blocks of query rows, so no layer's N x N map ever exists in
memory (a PiT on a 224 x 224 image has 50,177 tokens: one full fp32 map of one layer would
be 40 GB). The module's own forward is left alone, so the model's outputs are unchanged;
`norm` and `gate` act after attention @ v and do not change the attention itself.

This file also holds the extraction helpers `attention-maps` shares: finding the attention
modules, the hook context (`streamed_attention`) and the token geometry.

Distances are in the model's input coordinates: for a model trained on pixel-permuted
images that is the permuted grid the model sees.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from timm.layers.attention import Attention

from localitylab.errors import UserError
from localitylab.probes.base import Probe, ProbeContext, Row
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget

# The default query block holds at most this many attention logits (batch x heads x rows x
# keys), a few such temporaries per block; memory grows with N x block. On a CPU 4 MiB blocks
# stay in cache: 2.5-3.4x faster than 64 MiB ones (benchmarks/RESULTS.md). A GPU streams
# large blocks at full bandwidth and pays per kernel launch, so it keeps 64 MiB ones.
BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**24}
# The distances from every grid token to every other are kept whole up to this many.
DISTANCE_TABLE_ELEMENTS = 2**24

METRICS = ("mean_distance_px", "mean_distance_frac", "uniform_distance_px", "locality_ratio", "prefix_share",
           "entropy_norm")


# --- geometry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGeometry:
    """Where each token sits on the input image: grid (rows, cols) of patch_size pixels."""

    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int

    @classmethod
    def of(cls, target: ProbeTarget) -> "TokenGeometry":
        return cls(tuple(target.info.grid), int(target.info.patch_size), int(target.info.num_prefix_tokens))

    @property
    def num_grid_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_grid_tokens + self.num_prefix_tokens

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    @property
    def image_side(self) -> int:
        return max(self.image_shape)

    def centres(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(T, 2) pixel centres ((i + 0.5) p, (j + 0.5) p) of the grid tokens, row-major."""
        rows, cols = torch.meshgrid(torch.arange(self.grid[0], dtype=torch.float64),
                                    torch.arange(self.grid[1], dtype=torch.float64), indexing="ij")
        centres = (torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1) + 0.5) * self.patch_size
        return centres.to(device=device, dtype=dtype)

    def uniform_distance_px(self) -> float:
        """Mean distance between two tokens drawn uniformly (self pairs included).

        Counted by offset, (G_h - |di|)(G_w - |dj|) pairs per offset, so it costs O(grid)
        rather than O(T^2): the 224 x 224 PiT grid has 2.5e9 pairs.
        """
        rows, cols = self.grid
        di = np.arange(-(rows - 1), rows)
        dj = np.arange(-(cols - 1), cols)
        counts = np.outer(rows - np.abs(di), cols - np.abs(dj)).astype(np.float64)
        lengths = np.hypot(di[:, None], dj[None, :]) * self.patch_size
        return float((counts * lengths).sum() / self.num_grid_tokens**2)

    def token_of_pixel(self, row: int, col: int) -> int:
        """Index, prefix included, of the token whose patch contains pixel (row, col)."""
        return self.num_prefix_tokens + (row // self.patch_size) * self.grid[1] + col // self.patch_size


def pixel_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) Euclidean distances between pixel centres, from exact coordinate
    differences (multiples of half a patch) and one rounding in the square root, where
    |a|^2 + |b|^2 - 2ab would lose small distances in fp32."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


# --- extraction -------------------------------------------------------------------------------
def attention_modules(model: nn.Module) -> list[Attention]:
    """timm `Attention` modules in block order, the ones whose forward this probe can mirror.

    Subclasses that override `forward` compute something else (rotary embeddings, other
    scalings), so they are left out rather than measured wrongly.
    """
    return [m for m in model.modules() if isinstance(m, Attention) and type(m).forward is Attention.forward]


def no_attention_reason(target: ProbeTarget) -> str | None:
    """Why the attention probes cannot read this model, or None if they can."""
    if not attention_modules(target.model):
        return "no timm Attention modules (a ConvNet or another attention type): attention distance does not apply"
    if target.info.grid is None or target.info.patch_size is None:
        return "attention modules found, but the model has no patch_embed token grid to place tokens on"
    return None


def queries_and_keys(module: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (scaled) and k, (B, heads, N, head_dim), exactly as `Attention.forward` forms them."""
    batch, tokens, _ = x.shape
    qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    return q * module.scale, k


def attention_scores(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    """Attention logits (B, heads, len(rows), N) of the query tokens `rows` over all keys,
    masked as the module masks them (-inf where a key is not allowed)."""
    scores = q[:, :, rows] @ k.transpose(-2, -1)
    tokens = k.shape[-2]
    if is_causal:  # as timm's resolve_self_attn_mask, for these rows only
        keys = torch.arange(tokens, device=scores.device)
        scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    elif attn_mask is not None:
        mask = attn_mask[..., rows, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == tokens else attn_mask
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return scores


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    """Softmax attention (B, heads, len(rows), N) of the query tokens `rows` over all keys."""
    return attention_scores(q, k, rows, attn_mask, is_causal).softmax(dim=-1)


def default_query_block(batch: int, heads: int, tokens: int, device: torch.device | str = "cpu") -> int:
    elements = BLOCK_ELEMENTS.get(torch.device(device).type, BLOCK_ELEMENTS["cuda"])
    return max(1, elements // max(1, batch * heads * tokens))


# consume(layer, rows, attention): rows are token indices (prefix included); attention is
# (B, heads, len(rows), N): the softmax, or with scores=True the masked logits before it.
Consumer = Callable[[int, torch.Tensor, torch.Tensor], None]


@contextlib.contextmanager
def streamed_attention(modules: list[Attention], consume: Consumer, num_prefix_tokens: int,
                       query_tokens: torch.Tensor | None = None, query_block: int | None = None,
                       scores: bool = False) -> Iterator[None]:
    """While active, every forward of `modules[l]` also calls `consume(l, rows, probs)` for
    blocks of query rows: all non-prefix tokens, or `query_tokens`. The hooks are removed on
    exit, error or not; the modules' own computation (and so the model's output) is untouched.
    With `scores=True` the consumer gets the logits instead and never pays for a softmax it
    does not need.
    """
    rows_of = attention_scores if scores else attention_rows

    def make_hook(layer: int):
        def hook(module: Attention, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
            is_causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
            q, k = queries_and_keys(module, x)
            batch, heads, tokens, _ = q.shape
            rows = (torch.arange(num_prefix_tokens, tokens, device=x.device) if query_tokens is None
                    else query_tokens.to(x.device))
            block = query_block or default_query_block(batch, heads, tokens, x.device)
            for start in range(0, len(rows), block):
                block_rows = rows[start:start + block]
                consume(layer, block_rows, rows_of(q, k, block_rows, attn_mask, is_causal))
            return None

        return hook

    handles = []
    try:
        for layer, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def prepared_batches(target: ProbeTarget, images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield target.prepare(images[start:start + batch_size])


def check_token_count(probs: torch.Tensor, geometry: TokenGeometry) -> None:
    if probs.shape[-1] != geometry.num_tokens:
        raise UserError(f"the model attends over {probs.shape[-1]} tokens, but its grid {geometry.grid} and "
                        f"{geometry.num_prefix_tokens} prefix tokens make {geometry.num_tokens}; "
                        "attention probes need one token per grid cell")


# --- reduction --------------------------------------------------------------------------------
def attention_block_sums(probs: torch.Tensor, query_centres: torch.Tensor, key_centres: torch.Tensor,
                         num_prefix_tokens: int) -> dict[str, torch.Tensor]:
    """Per-head sums over images and queries of one block of attention rows (PROBES.md).

    probs: (B, heads, b, P + T) softmax rows; query_centres (b, 2) and key_centres (T, 2) in
    pixels. Returns float64 (heads,) sums of the distance d, the prefix share and the
    normalised entropy, and 'count' = B * b; dividing by it gives the means.

    This is PROBES.md's definition written out from the softmax, for any attention a caller
    has; the probe itself streams `attention_block_sums_from_scores`, which is checked
    against this one.
    """
    batch, heads, block, _ = probs.shape
    prefix_share = probs[..., :num_prefix_tokens].sum(dim=-1)
    grid_probs = probs[..., num_prefix_tokens:]
    renormalised = grid_probs / grid_probs.sum(dim=-1, keepdim=True)
    distances = pixel_distances(query_centres.double(), key_centres.double()).to(probs)  # (b, T)
    attended = (renormalised * distances).sum(dim=-1)
    num_keys = key_centres.shape[0]
    entropy = -torch.special.xlogy(renormalised, renormalised).sum(dim=-1)
    entropy = entropy / math.log(num_keys) if num_keys > 1 else torch.full_like(entropy, float("nan"))
    return {
        "distance": attended.double().sum(dim=(0, 2)),
        "prefix": prefix_share.double().sum(dim=(0, 2)),
        "entropy": entropy.double().sum(dim=(0, 2)),
        "count": torch.tensor(float(batch * block), dtype=torch.float64),
    }


def attention_block_sums_from_scores(scores: torch.Tensor, distances: torch.Tensor,
                                     num_prefix_tokens: int) -> dict[str, torch.Tensor]:
    """`attention_block_sums` from the logits, without forming the softmax: the same sums,
    in fewer passes over the (B, heads, b, N) block and no logarithm per key.

    scores: (B, heads, b, P + T) masked logits; distances: (b, T) pixel distances from each
    query to every grid key. With w = exp(s - max_grid s) over the grid keys and Z = sum w,
    A' = w / Z, so the distance is sum(w d) / Z, and since log A' = (s - max) - log Z the
    entropy is log Z - sum(w (s - max)) / Z. The prefix share is exp(logsumexp over prefix
    keys - logsumexp over all keys).
    """
    batch, heads, block, _ = scores.shape
    grid = scores[..., num_prefix_tokens:]
    grid_max = grid.amax(dim=-1, keepdim=True)
    shifted = grid - grid_max
    weights = shifted.exp()
    total = weights.sum(dim=-1)
    attended = (weights * distances).sum(dim=-1) / total
    shifted.nan_to_num_(neginf=0.0)  # masked keys: weight 0 times logit -inf would be NaN
    entropy = total.log() - (weights * shifted).sum(dim=-1) / total
    num_keys = distances.shape[-1]
    entropy = entropy / math.log(num_keys) if num_keys > 1 else torch.full_like(entropy, float("nan"))
    if num_prefix_tokens:
        grid_lse = grid_max.squeeze(-1) + total.log()
        prefix_lse = scores[..., :num_prefix_tokens].logsumexp(dim=-1)
        prefix_share = (prefix_lse - torch.logaddexp(prefix_lse, grid_lse)).exp()
    else:
        prefix_share = torch.zeros_like(total)
    return {
        "distance": attended.double().sum(dim=(0, 2)),
        "prefix": prefix_share.double().sum(dim=(0, 2)),
        "entropy": entropy.double().sum(dim=(0, 2)),
        "count": torch.tensor(float(batch * block), dtype=torch.float64),
    }


class AttentionDistanceAccumulator:
    """Running per-layer, per-head sums fed by `streamed_attention(..., scores=True)`."""

    def __init__(self, geometry: TokenGeometry, num_layers: int, device: torch.device | str):
        self.geometry = geometry
        self.device = device
        self.sums: list[dict[str, torch.Tensor] | None] = [None] * num_layers
        # Every layer and batch asks for the same rows' distances: keep the whole table
        # (per dtype) when it is small, up to 4,096 grid tokens; else the centres, and
        # compute each block's distances as it comes.
        self.keep_table = geometry.num_grid_tokens**2 <= DISTANCE_TABLE_ELEMENTS
        self.cache: dict[torch.dtype, torch.Tensor] = {}

    def distances(self, grid_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(rows, T) pixel distances from the grid tokens `grid_rows` to every grid token."""
        if dtype not in self.cache:
            centres = self.geometry.centres(self.device, dtype)
            self.cache[dtype] = pixel_distances(centres, centres) if self.keep_table else centres
        if self.keep_table:
            return self.cache[dtype][grid_rows]
        centres = self.cache[dtype]
        return pixel_distances(centres[grid_rows], centres)

    def __call__(self, layer: int, rows: torch.Tensor, scores: torch.Tensor) -> None:
        check_token_count(scores, self.geometry)
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()  # bf16 / fp16 logits: reduce in fp32
        distances = self.distances(rows - self.geometry.num_prefix_tokens, scores.dtype)
        block = attention_block_sums_from_scores(scores, distances, self.geometry.num_prefix_tokens)
        current = self.sums[layer]
        self.sums[layer] = block if current is None else {k: current[k] + v.to(current[k]) for k, v in block.items()}

    def rows(self, n_images: int) -> list[Row]:
        uniform = self.geometry.uniform_distance_px()
        side = self.geometry.image_side
        rows = []
        for layer, sums in enumerate(self.sums):
            if sums is None:  # a block the forward pass never reached
                continue
            count = float(sums["count"])
            for head in range(len(sums["distance"])):
                mean_distance = float(sums["distance"][head]) / count
                values = {
                    "mean_distance_px": mean_distance,
                    "mean_distance_frac": mean_distance / side,
                    "uniform_distance_px": uniform,
                    "locality_ratio": mean_distance / uniform if uniform > 0 else float("nan"),
                    "prefix_share": float(sums["prefix"][head]) / count,
                    "entropy_norm": float(sums["entropy"][head]) / count,
                }
                rows += [Row(metric, value, layer, head, n_images=n_images) for metric, value in values.items()]
        return rows


def parse_query_block(value: object) -> int | None:
    if value is None:
        return None
    try:
        block = int(value)
        if block != float(value) or block < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"query_block must be a positive integer (query rows per block), got {value!r}") from None
    return block


@torch.no_grad()
def measure_attention_distance(target: ProbeTarget, images: torch.Tensor, batch_size: int = 64,
                               query_block: int | None = None) -> list[Row]:
    """Stream the model over uint8 `images` and return the attention-distance rows."""
    geometry = TokenGeometry.of(target)
    modules = attention_modules(target.model)
    accumulate = AttentionDistanceAccumulator(geometry, len(modules), target.device)
    with streamed_attention(modules, accumulate, geometry.num_prefix_tokens, query_block=query_block,
                            scores=True):
        for batch in prepared_batches(target, images, batch_size):
            target.model(batch)
    return accumulate.rows(len(images))


@register_probe
class AttentionDistance(Probe):
    name = "attention-distance"
    summary = "Mean attention distance per head and layer, in pixels and relative to uniform attention"
    applies_to = "transformers with timm Attention (pit-*, vit-*/P, timm ViT/DeiT)"
    option_names = ("query_block",)

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return no_attention_reason(target)

    def check_options(self, options: dict) -> None:
        parse_query_block(options.get("query_block"))

    def measure(self, target: ProbeTarget, context: ProbeContext) -> list[Row]:
        block = parse_query_block(context.option("query_block", None))
        return measure_attention_distance(target, context.images, context.batch_size, block)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        """ViT-paper view: a dot per head against depth, and the locality ratio per layer."""
        import matplotlib.pyplot as plt

        from localitylab.plotting import apply_style, model_colours, model_markers, save_figure

        frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        if frame.empty:
            return []
        frame = frame[frame["value"].notna() & frame["head"].notna()]
        if frame.empty:
            return []
        apply_style()
        models = sorted(frame["model"].unique())
        colours, markers = model_colours(models), model_markers(models)
        offsets = np.linspace(-0.15, 0.15, len(models)) if len(models) > 1 else [0.0]
        fig, (ax_dist, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
        for offset, model in zip(offsets, models):
            rows = frame[frame["model"] == model]
            dist = rows[rows["metric"] == "mean_distance_px"]
            ax_dist.scatter(dist["layer"].astype(float) + offset, dist["value"], color=colours[model],
                            marker=markers[model], s=22, alpha=0.85, label=model)
            uniform = rows.loc[rows["metric"] == "uniform_distance_px", "value"]
            if len(uniform):
                ax_dist.axhline(float(uniform.iloc[0]), color=colours[model], linestyle=":", linewidth=1)
            ratio = rows[rows["metric"] == "locality_ratio"]
            ax_ratio.scatter(ratio["layer"].astype(float) + offset, ratio["value"], color=colours[model],
                             marker=markers[model], s=12, alpha=0.35)
            per_layer = ratio.groupby("layer")["value"].mean()
            ax_ratio.plot(per_layer.index.astype(float) + offset, per_layer.values, color=colours[model],
                          marker=markers[model], label=model)
        ax_dist.set(xlabel="layer (block)", ylabel="mean attention distance (pixels)",
                    title="Attention distance per head")
        ax_ratio.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax_ratio.set(xlabel="layer (block)", ylabel="distance / uniform distance",
                     title="Locality ratio (1 = no preference)")
        for ax in (ax_dist, ax_ratio):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_dist.legend(fontsize="small", title="dotted: uniform attention", title_fontsize="x-small", loc="best",
                       framealpha=0.8)
        return [save_figure(fig, Path(out_dir) / "attention-distance.png")]
