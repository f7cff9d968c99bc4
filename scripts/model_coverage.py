"""Which timm models can localitylab's probes read? Writes docs/model-coverage.md (and .csv).

Every architecture in timm's model files that use softmax self-attention over image tokens
is built untrained at a small size (a few blocks, a narrow width, a small image: the same
code paths as the full model, at a fraction of the cost) and every probe is run on two
random images, through `localitylab.probe`, the function the command line uses. Each
outcome is one of:

- measured: the probe's table has values;
- refused: the probe says why it does not apply (its note, naming what it found);
- failed: the probe raised (a bug to fix: the target is that nothing fails).

Families (timm model files) are in two groups: the ViT family proper (a stack of
Transformer blocks attending over a grid of image tokens, flat or by stages), which the
attention probes should read, every architecture of it; and other models that use attention
somewhere (convolutional stages with attention in places, linear or channel attention),
their first few architectures, listed so their outcomes are known.

    python scripts/model_coverage.py                  # everything -> docs/model-coverage.md  (make coverage)
    python scripts/model_coverage.py --families eva,beit --per-family 2 --out /tmp/x.md

Regenerate it when timm is upgraded: the table names the timm version it was made with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# A flat ViT at a small size: two blocks, 64 wide, two heads of 32.
FLAT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
# Hierarchical models: two blocks a stage (so shifted windows and their plain twins both run).
MAX_PARAMS = 100e6  # an architecture that cannot be built smaller than this is not built
DEPTH_KEYS = ("depth", "depths", "layers", "depth_token_only", "local_up_to_layer", "cls_attn_layers")
SMALL_IMAGE = 128  # a flat model is rebuilt for an image near this side (probe costs grow with its pixels)
# A model with no token grid to size it by (stages, convolutions) runs on the first of these sides
# it takes (built for it where it takes `img_size`, fed it as it is where it follows the image):
# a forward at 224 px costs 12 times one at 64 px, and the full-size models dominate the run.
SMALL_SIDES = (64, 96, 128)
IMAGES = 2
# The coverage asks whether each probe runs, not for its intervals: 100 bootstrap resamples
# instead of the probes' 2,000 (the receptive field's resampled radii cost seconds a model).
RESAMPLES = 100


@dataclass(frozen=True)
class Family:
    """One timm model file: how to build its architectures small, and whether it is a ViT family."""

    module: str
    vit: bool  # counts towards the target: the attention probes should read it
    shrink: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None  # passed to the model (None: its own, or chosen from its grid)
    note: str = ""


FAMILIES: dict[str, Family] = {f.module: f for f in [
    Family("vision_transformer", True, FLAT),
    Family("vision_transformer_hybrid", True, FLAT, note="convolutional backbone, then ViT blocks"),
    Family("vision_transformer_relpos", True, FLAT),
    Family("vision_transformer_sam", True, {**FLAT, "global_attn_indexes": (1,), "window_size": 4}, 64),
    Family("deit", True, FLAT),
    Family("eva", True, FLAT),
    Family("beit", True, FLAT),
    Family("cait", True, {**FLAT, "depth_token_only": 1}),
    Family("convit", True, {**FLAT, "local_up_to_layer": 1}),
    Family("crossvit", True, {"depth": [[1, 1, 0]], "embed_dim": [32, 64], "num_heads": [2, 2]}),
    Family("xcit", True, {**FLAT, "cls_attn_layers": 1}),
    Family("swin_transformer", True, {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2), "window_size": 4}, 64),
    Family("swin_transformer_v2", True, {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2), "window_size": 4,
                                         "pretrained_window_sizes": (0, 0)}, 64),
    Family("swin_transformer_v2_cr", True, {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2),
                                            "window_size": 4}, 64),
    Family("pvt_v2", True, {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), "num_heads": (1, 2, 4, 8)}),
    Family("naflexvit", True, FLAT),
    Family("twins", True, {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), "num_heads": (1, 2, 4, 8)}),
    Family("tnt", True, {"depth": 2}),
    Family("nest", True, {"depths": (1, 1, 1), "embed_dims": (32, 64, 128), "num_heads": (1, 2, 4)}),
    Family("pit", True, {"depth": (1, 1, 1)}),
    Family("levit", True),
    Family("mvitv2", True),
    Family("hiera", True),
    Family("hieradet_sam2", True),
    Family("volo", True, {"layers": (1, 1, 1, 1)}),
    Family("tiny_vit", True, {"depths": (1, 1, 1, 1)}),
    Family("deepseek_vit", True, FLAT),
    Family("qwen3_vit", True, FLAT),
    Family("gemma4_vit", True, FLAT),
    Family("davit", False, {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)}),
    Family("gcvit", False),
    Family("maxxvit", False),
    Family("coat", False),
    Family("vitamin", False, {"depth": 2}),
    Family("efficientformer", False),
    Family("efficientformer_v2", False),
    Family("mobilevit", False),
    Family("edgenext", False),
    Family("fastvit", False),
    Family("efficientvit_mit", False),
    Family("efficientvit_msra", False),
    Family("metaformer", False),
]}

PROBES = ("attention-distance", "attention-maps", "pe-similarity", "receptive-field", "permutation")
# The cheapest settings of each probe that still run all of its code.
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "permutation": {"window_sizes": [2], "tile_grids": [2], "swap_fractions": [0.5], "swap_distances": ["inf"]},
    "receptive-field": {"ig_steps": 2},
}


class NotBuilt(Exception):
    """The architecture could not be built at a small size (a limit of this script, not of a probe)."""


@dataclass
class Outcome:
    status: str  # measured | refused | failed
    detail: str = ""


def quiet() -> contextlib.AbstractContextManager:
    """timm's warnings and logs about untrained or adapted models are noise here."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    logging.getLogger("timm").setLevel(logging.ERROR)
    return stack


# The other families (convolutional stages with attention in places) are listed by their first
# architectures only: their outcomes say what the probes do with such models, and most of them
# cannot be built small (no depth or width to shrink), so every one costs a full-size forward.
OTHER_FAMILY_ARCHITECTURES = 3


def architectures(families: Iterable[str], per_family: int | None = None) -> list[tuple[str, str]]:
    """(family, architecture) pairs: every architecture of a ViT family, the first few of the others."""
    import timm

    found = []
    for module in families:
        names = timm.list_models(module=module)
        limit = per_family if per_family is not None else (None if FAMILIES[module].vit else OTHER_FAMILY_ARCHITECTURES)
        found += [(module, name) for name in (names if limit is None else names[:limit])]
    return found


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def build_small(name: str, family: Family) -> tuple[nn.Module, dict[str, Any]]:
    """The architecture at a small size, and the keyword arguments it was built with.

    Tried in order: the family's shrink (depth and width), its depth alone (some models fix
    their width), then the model as timm defines it; an attempt is skipped when it would
    hold more than MAX_PARAMS parameters (counted on the meta device, where nothing is
    allocated)."""
    import timm

    from localitylab.models.describe import describe_model

    size = {"img_size": family.img_size} if family.img_size else {}
    depth_only = {k: v for k, v in family.shrink.items() if k in DEPTH_KEYS}
    attempts = []
    for shrink in (family.shrink, depth_only, {}):
        kwargs = dict(shrink, **size)
        if kwargs not in attempts:
            attempts.append(kwargs)
    errors = []
    for kwargs in attempts:
        try:
            with torch.device("meta"):
                params = sum(p.numel() for p in timm.create_model(name, pretrained=False, **kwargs).parameters())
        except Exception as err:  # noqa: BLE001 - the next attempt, or NotBuilt naming every reason
            errors.append(f"{type(err).__name__}: {first_line(err)}")
            continue
        if params > MAX_PARAMS:
            errors.append(f"{params / 1e6:.0f}M parameters with {kwargs or 'its own settings'}")
            continue
        try:
            model = _create(name, kwargs)
        except Exception as err:  # noqa: BLE001 - as above
            errors.append(f"{type(err).__name__}: {first_line(err)}")
            continue
        info = describe_model(model)
        spacing = info.patch_size
        if "img_size" not in kwargs and spacing and isinstance(spacing, int):
            # a 4x4 to 8x8 grid near SMALL_IMAGE pixels, the largest such grid the model takes
            # (Gemma 4's soft pooling wants a multiple of its pooling kernel in tokens)
            largest = max(4, min(8, SMALL_IMAGE // spacing))
            for side in (spacing * cells for cells in range(largest, 3, -1)):
                if info.grid is not None and side >= max(info.grid) * spacing:
                    break  # not smaller than its own (no grid: it follows the image)
                with contextlib.suppress(Exception):
                    small = _create(name, dict(kwargs, img_size=side))
                    if runs_on(small, side):
                        model, kwargs = small, dict(kwargs, img_size=side)
                        break
        if "img_size" not in kwargs:
            model, kwargs = on_small_images(name, model, kwargs)
        return model, kwargs
    raise NotBuilt("; ".join(errors))


def runs_on(model: nn.Module, side: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    except Exception:  # noqa: BLE001 - it does not take this size: the next one, or its own
        return False
    return True


def on_small_images(name: str, model: nn.Module, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The model built for (or, where it follows the image, fed) the first of SMALL_SIDES it
    takes below its own input size; as it is if none. `input_side` in the keyword arguments
    records an image size the model is fed without being built for it."""
    own = input_size(model, kwargs)[1]
    for side in SMALL_SIDES:
        if side >= own:
            break
        try:
            small = _create(name, dict(kwargs, img_size=side))
        except TypeError:  # no img_size argument: it follows the image, or it does not
            if runs_on(model, side):
                return model, dict(kwargs, input_side=side)
            continue
        except Exception:  # noqa: BLE001 - it cannot be built for this size
            continue
        if runs_on(small, side):
            return small, dict(kwargs, img_size=side)
    return model, kwargs


def described(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "as timm defines it"


def input_size(model: nn.Module, kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """The input the model was built for: timm's data config, at the image size it was given."""
    from localitylab.models.preprocessing import Preprocessing

    size = kwargs.get("input_side", kwargs.get("img_size"))
    return Preprocessing.of_model(model, size if isinstance(size, int) else None).input_size


def run_probes(model: nn.Module, images: torch.Tensor, probes: Iterable[str]) -> dict[str, Outcome]:
    from localitylab import probe

    labels = torch.zeros(len(images), dtype=torch.long)
    outcomes = {}
    for name in probes:
        try:
            table = probe(name, model, images, labels, preprocessing="prepared", batch_size=IMAGES,
                          options=FAST_OPTIONS.get(name))
        except Exception as err:  # noqa: BLE001 - the outcome the document reports
            outcomes[name] = Outcome("failed", f"{type(err).__name__}: {first_line(err)}")
            continue
        valued = table[table["value"].notna()]
        if len(valued):
            outcomes[name] = Outcome("measured", measured_detail(name, table))
        else:
            outcomes[name] = Outcome("refused", str(table["note"].iloc[0]))
    return outcomes


def measured_detail(probe_name: str, table: pd.DataFrame) -> str:
    """How much of the model a probe measured: for attention-distance, the layers with a
    distance among the attention layers it found (class attention has none; a module no
    adapter reads has a row saying why)."""
    layers = table["layer"].dropna().nunique()
    if probe_name == "attention-distance":
        rows = table[table["metric"] == "mean_distance_px"]
        distance = rows[rows["value"].notna()]["layer"].nunique()
        unread = rows[rows["note"].str.contains(" is not read", regex=False)]["layer"].nunique()
        detail = f"{distance} of {layers} attention layers with a distance"
        return detail + (f", {unread} not read" if unread else "")
    valued = table[table["value"].notna()]["layer"].dropna().nunique()
    return f"{valued} layers" if valued else ""


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:200]


def cover(pairs: list[tuple[str, str]], probes: Iterable[str] = PROBES, log=None) -> pd.DataFrame:
    """One row per architecture: family, name, how it was built, and each probe's outcome."""
    import localitylab.probes.measurements as probe_measurements

    probes = list(probes)
    rows = []
    saved, probe_measurements.RESAMPLES = probe_measurements.RESAMPLES, RESAMPLES
    try:
        for module, name in pairs:
            rows.append(cover_one(module, name, probes, log))
    finally:
        probe_measurements.RESAMPLES = saved
    return pd.DataFrame(rows)


def cover_one(module: str, name: str, probes: list[str], log=None) -> dict[str, Any]:
    """One architecture's row: how it was built and each probe's outcome."""
    family = FAMILIES[module]
    started = time.perf_counter()
    row: dict[str, Any] = {"family": module, "vit_family": family.vit, "architecture": name}
    with quiet(), contextlib.redirect_stdout(io.StringIO()):
        try:
            model, kwargs = build_small(name, family)
        except NotBuilt as err:
            row.update({"built": f"not built: {err}", "params": None, "input": ""})
            row.update({p: "not built" for p in probes})
            return row
        built, size = described(kwargs), input_size(model, kwargs)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(IMAGES, *size, generator=generator)
        outcomes = run_probes(model, images, probes)
    row.update({"built": built, "params": sum(p.numel() for p in model.parameters()),
                "input": "x".join(str(v) for v in size)})
    for probe_name, outcome in outcomes.items():
        row[probe_name] = outcome.status + (f": {outcome.detail}" if outcome.detail else "")
    row["seconds"] = round(time.perf_counter() - started, 2)
    if log:
        log(f"{module:28s} {name:50s} " + " ".join(f"{p}={row[p].split(':')[0]}" for p in probes))
    return row


def family_summary(table: pd.DataFrame, probes: Iterable[str]) -> pd.DataFrame:
    """Per family: architectures, and for each probe how many were measured / refused / failed."""
    out = []
    for module, rows in table.groupby("family", sort=False):
        record = {"family": module, "vit_family": bool(rows["vit_family"].iloc[0]), "architectures": len(rows),
                  "built": int((~rows["built"].str.startswith("not built")).sum())}
        for probe_name in probes:
            status = rows[probe_name].str.split(":").str[0]
            record[probe_name] = (f"{(status == 'measured').sum()} / {(status == 'refused').sum()} / "
                                  f"{(status == 'failed').sum()}")
        out.append(record)
    return pd.DataFrame(out)


def attention_measured(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per family: (are attention distances measured in at least one architecture; is every
    attention layer of every built architecture read, measured or reported as class attention)."""
    outcome = table["attention-distance"]
    with_distance = outcome.str.extract(r"^measured: (\d+) of", expand=False).astype(float).fillna(0) > 0
    built = ~table["built"].str.startswith("not built")
    fully = outcome.str.startswith("measured") & ~outcome.str.contains("not read", regex=False)
    families = table["family"]
    return with_distance.groupby(families, sort=False).any(), (fully | ~built).groupby(families, sort=False).all()


def render(table: pd.DataFrame, probes: list[str], seconds: float) -> str:
    import timm

    import localitylab

    summary = family_summary(table, probes)
    vit = table[table["vit_family"]]
    measured, fully_read = attention_measured(vit)
    with_values = vit["attention-distance"].str.startswith("measured").groupby(vit["family"], sort=False).any()
    failed = sum((table[p].str.startswith("failed")).sum() for p in probes)
    lines = [
        "# Model coverage: which timm models the probes read",
        "",
        f"Generated by `scripts/model_coverage.py` (`make coverage`) with timm {timm.__version__}, torch "
        f"{torch.__version__}, localitylab {localitylab.__version__}, in {seconds / 60:.1f} minutes. Regenerate it when "
        "timm is upgraded.",
        "",
        "Every architecture of each ViT-family timm model file below (and the first "
        f"{OTHER_FAMILY_ARCHITECTURES} of each other family using attention) is built untrained at a small size "
        "(the `built` column: "
        "a few blocks, a narrow width, a small image; the same code as the full model; `input_side`: the image "
        "size fed to a model that follows its input and could not be made smaller otherwise) and every probe runs on "
        f"{IMAGES} random images through `localitylab.probe` (intervals from {RESAMPLES} bootstrap resamples: the "
        "question here is whether a probe runs). An outcome is **measured** (the table has values), "
        "**refused** (the probe says why it does not apply, naming what it found) or **failed** (the probe raised: "
        "a bug).",
        "",
        f"- ViT families whose attention distances the attention probes measure: **{int(measured.sum())} of "
        f"{len(measured)}** ({measured.mean():.1%}); measured at all (attention-distance has values: also "
        f"class attention alone, which has no query position): **{int(with_values.sum())} of {len(with_values)}** "
        f"({with_values.mean():.1%}); not measured: {', '.join(with_values[~with_values].index) or 'none'}"
        if len(measured) else "- no ViT family in this run",
        f"- ViT families every attention layer of which is read (a distance, or class attention reported as such): "
        f"{int(fully_read.sum())} of {len(fully_read)}; not: {', '.join(fully_read[~fully_read].index) or 'none'}",
        f"- probe runs that failed: **{failed}** of {len(table) * len(probes)}",
        f"- architectures built: {int((~table['built'].str.startswith('not built')).sum())} of {len(table)}",
        "",
        "## Families",
        "",
        "Each probe column: architectures measured / refused / failed.",
        "",
        "| family | ViT family | architectures | built | " + " | ".join(probes) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in probes) + " |",
    ]
    for record in summary.to_dict("records"):
        lines.append(f"| {record['family']} | {'yes' if record['vit_family'] else 'no'} | {record['architectures']} | "
                     f"{record['built']} | " + " | ".join(record[p] for p in probes) + " |")
    lines += ["", "## Architectures", ""]
    for module, rows in table.groupby("family", sort=False):
        lines += [f"### {module}", "", "| architecture | built | input | " + " | ".join(probes) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in probes) + " |"]
        for record in rows.to_dict("records"):
            cells = [_cell(record[p]) for p in probes]
            lines.append(f"| `{record['architecture']}` | {_cell(record['built'])} | {record['input']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="timm model files, comma-separated")
    parser.add_argument("--per-family", type=int, default=None, help="at most this many architectures per family")
    parser.add_argument("--probes", default=",".join(PROBES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "model-coverage.md")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
    probes = [p for p in args.probes.split(",") if p]
    started = time.perf_counter()
    table = cover(architectures(families, args.per_family), probes, log=lambda line: print(line, flush=True))
    from localitylab.io import write_text

    write_text(args.out, render(table, probes, time.perf_counter() - started))
    write_text(args.out.with_suffix(".csv"), table.to_csv(index=False))
    print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
