"""Where the attention reader's time goes, per attention layer, against the module's own
`scaled_dot_product_attention` on the same tensors, timed in the same run.

The attention-distance probe costs a forward pass plus, in each attention layer, the
difference between the reader's `attend` and the fused SDPA kernel it replaces. This splits
that layer's cost into its parts, each timed over every query block of the layer:

- `sdpa`: the module's own kernel on all rows (the baseline; fused, no N x N map);
- `logits`: q k^T per block (`SdpaCall.logits`), a matrix multiply;
- `weights @ v`: the block's output numerator, a matrix multiply;
- `pieces`: the elementwise passes for the row maxima, exp, their sum and the entropy's
  sum (`compiled.grid_pieces`, compiled where the reader compiles it);
- `distance`: the attention-distance reductions of a block (`block_row_values`: the weighted
  pixel distance, entropy and prefix share);
- `attend`: the reader's whole layer call, torch path, with the attention-distance consumer
  (what the probe paid per layer before the fused kernel, Python and all);
- `fused`: the same call as the probe makes it now (`needs_weights=False`): the fused CPU
  kernel (`localitylab.attention.fused`), flash attention summing the probe's reductions in
  its online softmax (absent where the kernel did not build).

`floor` = (logits + weights @ v) / sdpa: what the two matrix multiplies alone cost against
the fused kernel, before any elementwise pass; an unfused reader cannot go below it.
Before timing, the layer output of `attend` and `fused` is checked against SDPA's.

The process keeps its block temporaries on the heap, as the reader sets it to
(`compiled.keep_block_memory`). Inputs: one image's q, k, v of one layer (random, seeded),
one prefix token, a square grid of pixel tokens: pit-n's 4 heads of width 16 and PiT-T's 3
heads of width 64.

    .venv/bin/python -m benchmarks.attention_parts [--tokens 1025 4097] [--runs 1 5]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import environment, median, timed_runs

SHAPES = {"pit-n": (4, 16), "pit-t": (3, 64)}  # heads, head width


def grid_side(tokens: int) -> int | None:
    """The side of the square grid of `tokens` = 1 prefix + side^2, or None if there is none."""
    side = math.isqrt(tokens - 1) if tokens >= 2 else 0
    return side if side and side * side == tokens - 1 else None


def layer_call(tokens: int, heads: int, width: int, seed: int = 0):
    """(SdpaCall, CallGeometry) of one layer on one image: `tokens` = 1 prefix + a square grid."""
    from localitylab.attention.adapters import CallGeometry, SdpaCall
    from localitylab.attention.geometry import TokenGeometry

    side = grid_side(tokens)
    if side is None:
        raise ValueError(f"tokens must be 1 + a square, got {tokens}")
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, tokens, width, generator=generator) for _ in range(3))
    centres = TokenGeometry((side, side), 1, 1).centres()
    query_centres = torch.cat([torch.full((1, 2), float("nan")), centres])
    where = CallGeometry(torch.arange(tokens), query_centres, centres, 1, torch.zeros(1, dtype=torch.long))
    return SdpaCall.of(q, k, v), where


def measure(model: str, tokens: int, warmup: int = 1, repeats: int = 5) -> dict:
    from localitylab.attention import fused
    from localitylab.attention.compiled import compiled, grid_pieces, keep_block_memory
    from localitylab.attention.reader import attend, default_query_block, softmax_pieces
    from localitylab.probes.attention_distance import block_row_values

    keep_block_memory()  # as `read_attention` does on entry
    heads, width = SHAPES[model]
    call, where = layer_call(tokens, heads, width)
    rows = where.grid_rows()
    block = default_query_block(1, heads, tokens)
    starts = range(0, len(rows), block)
    sdpa = F.scaled_dot_product_attention

    def run_attend(needs_weights: bool = True) -> torch.Tensor:
        return attend(0, call, where, rows, block_row_values, None, sdpa, needs_weights)

    expected = sdpa(call.q, call.k, call.v)
    torch.testing.assert_close(run_attend(), expected, rtol=1e-4, atol=1e-5)
    if fused.load():
        torch.testing.assert_close(run_attend(needs_weights=False), expected, rtol=1e-4, atol=1e-5)
    blocks = [rows[s:s + block] for s in starts]
    logits = [call.logits(r) for r in blocks]
    pieces = [softmax_pieces(0, block_logits, where, r)[0] for r, block_logits in zip(blocks, logits)]
    prefix = where.num_prefix_keys
    value_grid = call.v[..., prefix:, :]
    reduce = compiled(grid_pieces, tokens - prefix)

    parts = {
        "sdpa": lambda: sdpa(call.q, call.k, call.v),
        "logits": lambda: [call.logits(r) for r in blocks],
        "weights @ v": lambda: [p.grid_weights @ value_grid for p in pieces],
        "pieces": lambda: [reduce(block_logits[..., prefix:]) for block_logits in logits],
        "distance": lambda: [block_row_values(p) for p in pieces],
        "attend": run_attend,
    }
    if fused.load():
        parts["fused"] = lambda: run_attend(needs_weights=False)
    seconds = {name: median(timed_runs(fn, warmup, repeats)) for name, fn in parts.items()}
    base = seconds["sdpa"]
    return {"model": model, "tokens": tokens, "heads": heads, "head_width": width, "query_block": block,
            "blocks": len(blocks), "seconds": seconds, "ratio": {name: s / base for name, s in seconds.items()},
            "floor": (seconds["logits"] + seconds["weights @ v"]) / base, "runs": repeats, "warmup_runs": warmup,
            "threads": torch.get_num_threads()}


def print_table(results: list[dict]) -> None:
    names = list(results[0]["seconds"])
    print(f"{'model':<6} {'tokens':>6} {'block':>5}  " + "  ".join(f"{n:>11}" for n in names) + f"  {'floor':>5}")
    for r in results:
        cells = "  ".join(f"{r['seconds'][n] * 1e3:7.1f} ms" if n == "sdpa" else f"{r['ratio'][n]:10.2f}x"
                          for n in names)
        print(f"{r['model']:<6} {r['tokens']:>6} {r['query_block']:>5}  {cells}  {r['floor']:5.2f}")
    print("(sdpa in ms per layer on one image; the rest as multiples of it)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_parts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1025, 4097], help="1 + a square each")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--runs", nargs=2, type=int, default=(1, 5), metavar=("WARMUP", "TIMED"))
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    bad = [t for t in args.tokens if grid_side(t) is None]
    if bad:
        parser.error(f"--tokens must each be 1 + a square (1025 = 1 + 32^2), got {bad}")
    with torch.no_grad():
        results = [measure(model, tokens, *args.runs) for model in args.models for tokens in args.tokens]
    print_table(results)
    if args.json:
        from pathlib import Path

        from localitylab.io import write_json

        write_json(Path(args.json), {"environment": environment("cpu"), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
