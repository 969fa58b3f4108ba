"""Command line options; mirrors modules/shared_cmd_options.py + modules/cmd_args.py (a subset)."""
import argparse
import os

from modules.paths_internal import data_path

# mirrors modules/cmd_args.py (parser): only the flags an extension is likely to read
parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=str, default=data_path)
parser.add_argument("--models-dir", type=str, default=None)
parser.add_argument("--ckpt-dir", type=str, default=None)
parser.add_argument("--embeddings-dir", type=str, default=os.path.join(data_path, "embeddings"))
parser.add_argument("--no-half", action="store_true")
parser.add_argument("--no-half-vae", action="store_true")
parser.add_argument("--precision", type=str, default="autocast", choices=["full", "half", "autocast"])
parser.add_argument("--upcast-sampling", action="store_true")
parser.add_argument("--medvram", action="store_true")
parser.add_argument("--medvram-sdxl", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--disable-nan-check", action="store_true")
parser.add_argument("--disable-safe-unpickle", action="store_true", default=False)
parser.add_argument("--hide-ui-dir-config", action="store_true", default=False)
parser.add_argument("--freeze-settings", action="store_true", default=False)
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--api", action="store_true")
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--api-log", action="store_true")
parser.add_argument("--no-hashing", action="store_true", default=False)
parser.add_argument("--no-prompt-history", action="store_true", default=True)  # double: default True so no params.txt is written
parser.add_argument("--opt-channelslast", action="store_true")

cmd_opts = parser.parse_args([])  # mirrors modules/shared_cmd_options.py (cmd_opts); tests set attributes directly
