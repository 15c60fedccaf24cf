"""glimpse: build, train, evaluate and serve vision-language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `glimpse.load` is glimpse.api.load itself, imported on first use so that `import glimpse` stays light
    if name == "load":
        from glimpse.api import load

        return load
    raise AttributeError(f"module 'glimpse' has no attribute {name!r}")
