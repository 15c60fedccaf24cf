"""glimpse: build, train, evaluate and serve vision-language models."""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """Load a trained glimpse run as a pipeline; see glimpse.api.load."""
    from glimpse.api import load as _load

    return _load(path, device)
