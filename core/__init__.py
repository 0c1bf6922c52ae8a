"""fakecifar: composable tools for synthetic-image and model-extraction research on small images.

The library is usable without the CLI, e.g. `from fakecifar.shards import open_shards`.
Submodules are imported on demand so that light paths (`fakecifar --help`, `detect`) never
pay for torch.
"""

__version__ = "0.1.0"
