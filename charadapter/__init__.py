"""Character-Adapter: region-level IP-Adapter with attention dynamic fusion.

Host-free: this package imports torch, numpy, PIL, OpenCV, safetensors and transformers only.
The WebUI adapter lives in ``charadapter.webui`` and is the only code that imports ``modules``.
"""

__version__ = "0.1.0"
