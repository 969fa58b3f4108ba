"""Process-wide state; mirrors modules/shared.py (and what modules/shared_init.py fills in)."""
import sys

from modules import shared_cmd_options, options, shared_options, shared_state, devices
from modules.paths_internal import models_path, script_path, data_path, sd_configs_path, extensions_dir, extensions_builtin_dir  # noqa: F401  mirrors modules/shared.py

cmd_opts = shared_cmd_options.cmd_opts  # mirrors modules/shared.py (cmd_opts)
parser = shared_cmd_options.parser  # mirrors modules/shared.py (parser)

batch_cond_uncond = True  # mirrors modules/shared.py (batch_cond_uncond): old field, unused; read opts.batch_cond_uncond
parallel_processing_allowed = True  # mirrors modules/shared.py (parallel_processing_allowed): False under --lowvram/--medvram
demo = None  # mirrors modules/shared.py (demo): the gr.Blocks; None in API-only mode
device = devices.device  # mirrors modules/shared.py (device): set by shared_init.initialize from devices.device
hypernetworks = {}
loaded_hypernetworks = []

options_templates = shared_options.options_templates  # mirrors modules/shared.py (options_templates)
opts = options.Options(options_templates, shared_options.restricted_opts)  # mirrors modules/shared.py (opts), created in shared_init.initialize
restricted_opts = shared_options.restricted_opts
state = shared_state.State()  # mirrors modules/shared.py (state), created in shared_init.initialize

sd_model = None  # mirrors modules/shared.py (sd_model): in the WebUI a property of the module that loads on first access

settings_components = None
tab_names = []

latent_upscale_default_mode = "Latent"  # mirrors modules/shared.py (latent_upscale_default_mode)
latent_upscale_modes = {  # mirrors modules/shared.py (latent_upscale_modes)
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
sd_upscalers = []  # mirrors modules/shared.py (sd_upscalers): the double has no pixel upscalers
progress_print_out = sys.stdout

options_section = options.options_section  # mirrors modules/shared.py (options_section)
OptionInfo = options.OptionInfo  # mirrors modules/shared.py (OptionInfo)
OptionHTML = options.OptionHTML  # mirrors modules/shared.py (OptionHTML)


class _TotalTQDM:  # mirrors modules/shared_total_tqdm.py (TotalTQDM), without a progress bar
    def reset(self):
        pass

    def update(self):
        pass

    def updateTotal(self, new_total):
        pass

    def clear(self):
        pass


total_tqdm = _TotalTQDM()  # mirrors modules/shared.py (total_tqdm)


class _PromptStyles:  # mirrors modules/styles.py (StyleDatabase): the double knows no styles
    styles = {}

    def apply_styles_to_prompt(self, prompt, styles):
        return prompt

    def apply_negative_styles_to_prompt(self, prompt, styles):
        return prompt


prompt_styles = _PromptStyles()  # mirrors modules/shared.py (prompt_styles)


_base_option_keys = list(options_templates)


def reset_for_tests():  # double-only
    """Restore default settings, a fresh job state, default flags and no model, all in place
    (the WebUI's own modules hold `from modules.shared import opts, state` references)."""
    global sd_model
    for key in list(opts.data_labels):
        if key not in _base_option_keys:
            del opts.data_labels[key]
    for info in opts.data_labels.values():
        info.onchange = None
    opts.data = {k: v.default for k, v in opts.data_labels.items() if not v.do_not_save}
    state.__dict__.clear()
    state.__init__()
    sd_model = None
    for flag in ("medvram", "medvram_sdxl", "lowvram", "no_half", "disable_safe_unpickle"):
        setattr(cmd_opts, flag, False)
