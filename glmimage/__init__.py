"""glmimage: a hardware-agnostic PyTorch implementation of GLM-Image (AR prior + diffusion decoder)."""

__version__ = "0.1.0"


def __getattr__(name):
    # import lazily so `import glmimage` stays cheap (the CLI, the data tools)
    if name == "Pipeline":
        from glmimage.pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)


__all__ = ["Pipeline"]
