"""FID, sFID and IS with the standard Inception-v3 weights, when the user has them.

The weights are the TensorFlow graph of Szegedy et al. (inception-2015-12-05) that FID
(Heusel et al. 2017), sFID (Nash et al. 2021) and IS (Salimans et al. 2016) are defined
with, as torch-fidelity converts them (`weights-inception-2015-12-05-6726825d.pth`). They
are never downloaded here: the user passes the file (`inception_weights FILE`). It is read
with `torch.load(weights_only=True)` first (torch-fidelity itself unpickles without that
guard), and torch-fidelity's network (its TF-compatible resizing included) computes:

- `fid`: the Fréchet distance of the 2,048-d pool features (`pool_3`);
- `sfid`: the same on the first 7 channels of the 17x17 map of `mixed_6/conv` (ADM's
  evaluator, Dhariwal & Nichol 2021), which torch-fidelity's conversion names
  `Mixed_6d.branch1x1`; 2,023 features per image;
- `inception_score`: exp E[KL(p(y|x) || p(y))] over the 1,008 logits, the mean over 10
  splits (fewer when there are fewer than 10 images), its spread in the note.

Grey images are repeated to three channels. These numbers are comparable with published
ones only at the published sample counts (50,000 for FID and IS) and image sizes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import torch

from localitylab.diffusion.feature_metrics import frechet_distance
from localitylab.errors import UserError
from localitylab.io import safe_torch_load
from localitylab.probes.base import Measurements

SFID_CHANNELS = 7
IS_SPLITS = 10


def load_inception(path: str | Path, device: torch.device | str = "cpu"):
    """torch-fidelity's Inception-v3 with the weights in `path` (a UserError if they are not those)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError("FID, sFID and IS need torch-fidelity: pip install 'localitylab[inception]'") from None

    state = safe_torch_load(path)  # tensors and plain values only, or a one-line UserError
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not an Inception-v3 state dict (a mapping of names to tensors)")
    with tempfile.TemporaryDirectory() as folder:
        # torch-fidelity loads its weights from a path, without weights_only: give it a file
        # written here from the tensors just checked.
        checked = Path(folder) / "inception.pt"
        torch.save(state, checked)
        try:
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                    feature_extractor_weights_path=str(checked))
        except RuntimeError as err:
            raise UserError(f"{path} does not hold the Inception-v3 weights torch-fidelity expects: "
                            f"{str(err).splitlines()[0]}") from None
    return extractor.to(device).eval()


@torch.no_grad()
def inception_features(extractor, images: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """{'pool': (N, 2048), 'spatial': (N, 2023), 'logits': (N, 1008)} for uint8 images (N, C, H, W)."""
    device = next(extractor.parameters()).device
    captured: list[torch.Tensor] = []
    hook = extractor.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, args, output: captured.append(output[:, :SFID_CHANNELS].flatten(1).float().cpu()))
    pool, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            features, unbiased = extractor(batch)
            pool.append(features.cpu())
            logits.append(unbiased.cpu())
    finally:
        hook.remove()
    return {"pool": torch.cat(pool), "spatial": torch.cat(captured), "logits": torch.cat(logits)}


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, standard deviation) over splits, by torch-fidelity's computation (images in a
    fixed shuffled order)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(splits, len(logits)))
    result = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return result["inception_score_mean"], result["inception_score_std"]


def inception_rows(extractor, reference: torch.Tensor, sources: list, batch_size: int = 64) -> pd.DataFrame:
    """fid, sfid and inception_score of every source (`quality.Source`) against `reference` images."""
    from localitylab.generation.quality import PROBE

    reference_features = inception_features(extractor, reference, batch_size)
    frames = []
    for source in sources:
        features = inception_features(extractor, source.images, batch_size)
        rows = Measurements()
        n = len(source.images)
        rows.single("fid", frechet_distance(features["pool"], reference_features["pool"]), setting=source.setting,
                    note="Inception-v3 pool_3 features", n_images=n)
        rows.single("sfid", frechet_distance(features["spatial"], reference_features["spatial"]),
                    setting=source.setting, note="Inception-v3 mixed_6/conv, 7 channels (ADM)", n_images=n)
        mean, spread = inception_score(features["logits"])
        splits = max(1, min(IS_SPLITS, n))
        rows.single("inception_score", mean, setting=source.setting,
                    note=f"mean over {splits} splits; standard deviation {spread:.4g}", n_images=n)
        frames.append(rows.to_frame(source.name, PROBE))
    return pd.concat(frames, ignore_index=True)
