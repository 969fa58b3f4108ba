"""Run by the WebUI at start-up: install only what the host lacks.

The WebUI already ships torch, numpy, Pillow, opencv-python, safetensors and transformers; this
file checks them so that a stripped-down install gets a clear message instead of an import error
later.
"""

import launch

REQUIRED = {
    # import name: pip requirement
    "safetensors": "safetensors>=0.3",
    "transformers": "transformers>=4.30",
    "cv2": "opencv-python",  # masks: connected components and hole filling
}

for module_name, requirement in REQUIRED.items():
    if not launch.is_installed(module_name):
        launch.run_pip(f"install {requirement}", f"{requirement} for Character-Adapter")
