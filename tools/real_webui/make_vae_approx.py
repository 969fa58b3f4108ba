"""A random-weight VAEApprox for SDXL: models/VAE-approx/vaeapprox-sdxl.pt.

The WebUI loads the live-preview decoder before every generation (modules/processing.py
process_images_inner: live_previews_enable and show_progress_type "Approx NN", the defaults) and
downloads it when absent (modules/sd_vae_approx.py model()): the SD1 one ships in the WebUI's
tree, the SDXL one does not, so offline every SDXL generation fails with a URLError. This builds
the WebUI's own VAEApprox class (4 latent channels), seeded, and saves its state dict with this
torch (the WebUI's safe unpickler, modules/safe.py, reads it).

    cd <webui> && python make_vae_approx.py models/VAE-approx/vaeapprox-sdxl.pt
"""
import os
import sys

import torch


def main(out_path, webui_dir="."):
    sys.path.insert(0, os.path.abspath(webui_dir))
    sys.argv = sys.argv[:1]  # modules.shared parses the command line
    from modules.sd_vae_approx import VAEApprox

    torch.manual_seed(0)
    model = VAEApprox(latent_channels=4)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(model.state_dict(), out_path)
    print(out_path, len(model.state_dict()), "tensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
