"""Two .bin IP-Adapters (nested layout, torch.save) to check the WebUI's safe unpickler path:

- ip-adapter_sd15_newtorch.bin: as this torch writes it (zip holds .format_version /
  .storage_alignment, which modules/safe.py's check_pt rejects: the loader must say so clearly);
- ip-adapter_sd15_oldzip.bin: the same with those entries dropped, like files written by the
  torch versions h94 used (must load).

    python make_bin_adapters.py <webui>/models/ipadapter
"""
import os
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests"))
import fake_weights  # noqa: E402


def main(folder):
    new = os.path.join(folder, "ip-adapter_sd15_newtorch.bin")
    old = os.path.join(folder, "ip-adapter_sd15_oldzip.bin")
    fake_weights.write_bin(fake_weights.variant_state("sd15", seed=2), new)
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename.rsplit("/", 1)[-1] in (".format_version", ".storage_alignment"):
                continue
            dst.writestr(info, src.read(info.filename))
    torch.load(old, map_location="cpu", weights_only=True)  # still a valid torch file
    with zipfile.ZipFile(new) as z:
        print(new, [n for n in z.namelist() if "/data/" not in n])
    print(old)


if __name__ == "__main__":
    main(sys.argv[1])
