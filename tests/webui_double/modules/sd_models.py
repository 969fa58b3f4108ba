"""Checkpoint bookkeeping; mirrors modules/sd_models.py (no real loading).

`register_model` (double-only) does what load_model + load_model_weights + sd_hijack do to a
model the test built itself: type flags, hash, checkpoint info, cond_stage_model_empty_prompt,
the text-encoder hijack, and shared.sd_model.
"""
import enum
import hashlib
import os

import torch

from modules import shared, paths_internal

model_dir = "Stable-diffusion"  # mirrors modules/sd_models.py (model_dir)
checkpoints_list = {}  # mirrors (checkpoints_list): title -> CheckpointInfo
checkpoint_aliases = {}  # mirrors (checkpoint_aliases)
checkpoints_loaded = {}  # mirrors (checkpoints_loaded)


class ModelType(enum.Enum):  # mirrors modules/sd_models.py (ModelType)
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def model_hash(filename):  # mirrors modules/sd_models.py (model_hash): old 8-hex hash of 64 KiB at offset 1 MiB
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return 'NOFILE'


class CheckpointInfo:  # mirrors modules/sd_models.py (CheckpointInfo); sha256 of the whole file, not cached
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        model_path = os.path.abspath(os.path.join(paths_internal.models_path, model_dir))
        name = abspath.replace(model_path, '') if abspath.startswith(model_path) else os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.metadata = {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = None
        if os.path.isfile(filename):
            with open(filename, "rb") as file:
                self.sha256 = hashlib.sha256(file.read()).hexdigest()
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f'{name} [{self.hash}]']
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']

    def register(self):  # mirrors (CheckpointInfo.register)
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):  # mirrors (CheckpointInfo.calculate_shorthash)
        return self.shorthash


def get_closet_checkpoint_match(search_string):  # mirrors modules/sd_models.py (get_closet_checkpoint_match)
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():  # mirrors modules/sd_models.py (select_checkpoint)
    model = shared.sd_model
    return None if model is None else model.sd_checkpoint_info


def reload_model_weights(sd_model=None, info=None, forced_reload=False):  # mirrors (reload_model_weights): the double never swaps models
    return shared.sd_model


def apply_token_merging(sd_model, token_merging_ratio):  # mirrors (apply_token_merging): no-op
    pass


def apply_alpha_schedule_override(sd_model, p=None):  # mirrors (apply_alpha_schedule_override): no-op
    pass


class SkipWritingToConfig:  # mirrors modules/sd_models.py (SkipWritingToConfig)
    skip = False

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def get_empty_cond(sd_model):  # mirrors modules/sd_models.py (get_empty_cond): the '' prompt through the hijacked encoder
    with torch.no_grad():
        d = sd_model.get_learned_conditioning([""]) if hasattr(sd_model, 'get_learned_conditioning') else sd_model.cond_stage_model([""])
    if isinstance(d, dict):
        d = d['crossattn']
    return d


def register_model(sd_model, filename=None, arch="sd1"):  # double-only
    """Make a test-built LatentDiffusion look like a model the WebUI loaded, and make it shared.sd_model."""
    from modules import lowvram, sd_hijack, sd_hijack_unet
    sd_hijack_unet.hijack_apply_model(type(sd_model))  # the WebUI patches LatentDiffusion.apply_model at import
    for flag in ("is_sd1", "is_sd2", "is_sdxl", "is_ssd", "is_sd3"):
        setattr(sd_model, flag, False)
    setattr(sd_model, {"sd1": "is_sd1", "sd2": "is_sd2", "sdxl": "is_sdxl"}[arch], True)
    sd_model.model_type = {"sd1": ModelType.SD1, "sd2": ModelType.SD2, "sdxl": ModelType.SDXL}[arch]
    if not hasattr(sd_model, 'latent_channels'):
        sd_model.latent_channels = 4
    sd_model.is_sdxl_inpaint = False
    lowvram.apply(sd_model)  # as sd_models.load_model does (send_model_to_device), before the hijack
    if filename is None:
        filename = os.path.join(paths_internal.models_path, model_dir, "double.safetensors")
    info = CheckpointInfo(filename)
    info.register()
    sd_model.sd_checkpoint_info = info
    sd_model.sd_model_checkpoint = info.filename
    sd_model.sd_model_hash = info.shorthash
    if arch == "sd1":
        sd_hijack.model_hijack.hijack(sd_model)
    shared.sd_model = sd_model
    sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model
