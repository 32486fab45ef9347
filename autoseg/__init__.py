"""autoseg: self-configuring medical image segmentation."""

from autoseg.errors import AutosegError

__version__ = "0.1.0"

__all__ = ["AutosegError", "__version__"]
