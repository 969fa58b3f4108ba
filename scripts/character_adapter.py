"""WebUI entry point: a thin AlwaysOn script; the work is in charadapter.webui."""

import os
import sys

from modules import scripts

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.insert(0, _root)

from charadapter.webui.script import TITLE, ScriptHooks, register_callbacks  # noqa: E402

register_callbacks()


class CharacterAdapterScript(scripts.Script):
    def __init__(self):
        super().__init__()
        self.hooks = ScriptHooks()

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return self.hooks.ui(self, is_img2img)

    def process(self, p, *args):
        self.hooks.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.hooks.process_before_every_sampling(p, *args, **kwargs)

    def postprocess(self, p, processed, *args):
        self.hooks.postprocess(p, processed, *args)
