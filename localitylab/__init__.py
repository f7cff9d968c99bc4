"""localitylab: how much locality did a vision model learn?

Train and load Pixel Transformers (one token per pixel), ViTs and ConvNets, probe their
locality, and write reports. The library never imports the CLI; heavy imports (torch,
timm) happen on first use, so `localitylab --help` stays quick.

    import localitylab
    model = localitylab.load("runs/pit-n-digits/ckpt.pt")   # eval mode; model.run has its spec
    table = localitylab.probe("attention-distance", model, uint8_images)   # any nn.Module probes can read
"""

from localitylab.version import __version__  # noqa: F401

# The API (loaded on first use, below); `dir(localitylab)` lists it.
__all__ = ["load", "probe", "train", "TrainConfig", "evaluate", "probe_over_training", "Preprocessing", "__version__"]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    # Lazy: importing the package must not import torch. `localitylab.train` is always the
    # training package (its loop is localitylab.train.train), never a function that the
    # package's import would later hide.
    if name == "load":
        from localitylab.train.checkpoint import load

        return load
    if name == "probe":
        from localitylab.probes.api import probe

        return probe
    if name == "probe_over_training":
        from localitylab.probes.runner import probe_over_training

        return probe_over_training
    if name == "Preprocessing":
        from localitylab.models.preprocessing import Preprocessing

        return Preprocessing
    if name in ("train", "TrainConfig", "evaluate"):
        import localitylab.train as training

        return getattr(training, name)
    raise AttributeError(f"module 'localitylab' has no attribute {name!r}")
