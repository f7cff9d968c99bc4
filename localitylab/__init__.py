"""localitylab: how much locality did a vision model learn?

Train and load Pixel Transformers (one token per pixel), ViTs and ConvNets, probe their
locality, and write reports. The library never imports the CLI; heavy imports (torch,
timm) happen on first use, so `localitylab --help` stays quick.

    import localitylab
    model = localitylab.load("runs/pit-n-digits/ckpt.pt")   # eval mode; model.run has its spec
"""

from localitylab.version import __version__  # noqa: F401


def __getattr__(name):
    # Lazy: importing the package must not import torch. `localitylab.train` is always the
    # training package (its loop is localitylab.train.train), never a function that the
    # package's import would later hide.
    import importlib

    if name == "load":
        from localitylab.train.checkpoint import load

        return load
    if name == "train":
        return importlib.import_module("localitylab.train")
    if name in ("TrainConfig", "evaluate"):
        return getattr(importlib.import_module("localitylab.train"), name)
    raise AttributeError(f"module 'localitylab' has no attribute {name!r}")
