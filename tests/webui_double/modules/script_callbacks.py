"""Callback registry; mirrors modules/script_callbacks.py.

Every dispatcher wraps each callback in try/except and reports the error, like the WebUI.
Ordering by extension metadata (sort_callbacks) is not modelled: callbacks run in
registration order, except script_unloaded and before_ui which run in reverse (as in v1.10.1).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Optional

from modules import errors, timer, extensions


def _caller_file():
    """The file of the nearest caller outside this module: what the WebUI finds with
    `[x for x in inspect.stack() if x.filename != __file__][0].filename`, without building
    every frame's source context (1.3 s per host start under pytest)."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else 'unknown file'


def report_exception(c, job):  # mirrors modules/script_callbacks.py (report_exception)
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ImageSaveParams:  # mirrors modules/script_callbacks.py (ImageSaveParams)
    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


class ExtraNoiseParams:  # mirrors modules/script_callbacks.py (ExtraNoiseParams)
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:  # mirrors modules/script_callbacks.py (CFGDenoiserParams)
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        """latent rows for the UNet: cond rows (one per AND sub-prompt, image by image), then one uncond row per image"""
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        """shared.state.sampling_step: set by the sampler callback *after* each step, so it lags the call by one"""
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        """(n_cond_rows, T, C) tensor, or a dict with 'crossattn' and 'vector' for SDXL"""
        self.text_uncond = text_uncond
        """(n_images, T', C) tensor or dict; T' may differ from T"""
        self.denoiser = denoiser
        """the CFGDenoiser: .step counts model calls (0-based), .total_steps, .p"""


class CFGDenoisedParams:  # mirrors modules/script_callbacks.py (CFGDenoisedParams)
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:  # mirrors modules/script_callbacks.py (AfterCFGCallbackParams)
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


class ImageGridLoopParams:  # mirrors modules/script_callbacks.py (ImageGridLoopParams)
    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class BeforeTokenCounterParams:  # mirrors modules/script_callbacks.py (BeforeTokenCounterParams)
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


@dataclasses.dataclass
class ScriptCallback:  # mirrors modules/script_callbacks.py (ScriptCallback)
    script: str
    callback: Any
    name: str = "unnamed"


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):  # mirrors modules/script_callbacks.py (add_callback)
    """Append a callback, named '<extension>/<file>/<category>[/<name>]'; `script` is the caller's file."""
    if filename is None:
        filename = _caller_file()
    extension = extensions.find_extension(filename)
    extension_name = extension.canonical_name if extension else 'base'
    callback_name = f"{extension_name}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f'/{name}'
    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f'{callback_name}-{index+1}'
    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):  # mirrors modules/script_callbacks.py (sort_callbacks); no metadata ordering in the double
    return unordered_callbacks.copy()


def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):  # mirrors modules/script_callbacks.py (ordered_callbacks)
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])
    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)
    callbacks = ordered_callbacks_map.get(category)
    if callbacks is not None and len(callbacks) == len(unordered_callbacks):
        return callbacks
    callbacks = sort_callbacks(category, unordered_callbacks)
    ordered_callbacks_map[category] = callbacks
    return callbacks


callback_map = dict(  # mirrors modules/script_callbacks.py (callback_map)
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_train_tabs=[],
    callbacks_ui_settings=[],
    callbacks_before_image_saved=[],
    callbacks_image_saved=[],
    callbacks_extra_noise=[],
    callbacks_cfg_denoiser=[],
    callbacks_cfg_denoised=[],
    callbacks_cfg_after_cfg=[],
    callbacks_before_component=[],
    callbacks_after_component=[],
    callbacks_image_grid=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_on_reload=[],
    callbacks_list_optimizers=[],
    callbacks_list_unets=[],
    callbacks_before_token_counter=[],
)

ordered_callbacks_map = {}  # mirrors modules/script_callbacks.py (ordered_callbacks_map)


def clear_callbacks():  # mirrors modules/script_callbacks.py (clear_callbacks): scripts.load_scripts calls it on every (re)load
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run(category, job, *args):
    """Call every callback of a category, reporting (not raising) its errors."""
    for c in ordered_callbacks(category):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


def app_started_callback(demo: Optional[Any], app: Any):  # mirrors (app_started_callback): demo is None with --nowebui
    for c in ordered_callbacks('app_started'):
        try:
            c.callback(demo, app)
            timer.startup_timer.record(os.path.basename(c.script))
        except Exception:
            report_exception(c, 'app_started_callback')


def app_reload_callback():  # mirrors (app_reload_callback)
    _run('on_reload', 'callbacks_on_reload')


def model_loaded_callback(sd_model):  # mirrors (model_loaded_callback)
    _run('model_loaded', 'model_loaded_callback', sd_model)


def ui_tabs_callback():  # mirrors (ui_tabs_callback)
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():  # mirrors (ui_settings_callback)
    _run('ui_settings', 'ui_settings_callback')


def before_image_saved_callback(params: ImageSaveParams):  # mirrors (before_image_saved_callback)
    _run('before_image_saved', 'before_image_saved_callback', params)


def image_saved_callback(params: ImageSaveParams):  # mirrors (image_saved_callback)
    _run('image_saved', 'image_saved_callback', params)


def extra_noise_callback(params: ExtraNoiseParams):  # mirrors (extra_noise_callback)
    _run('extra_noise', 'callbacks_extra_noise', params)


def cfg_denoiser_callback(params: CFGDenoiserParams):  # mirrors (cfg_denoiser_callback)
    _run('cfg_denoiser', 'cfg_denoiser_callback', params)


def cfg_denoised_callback(params: CFGDenoisedParams):  # mirrors (cfg_denoised_callback)
    _run('cfg_denoised', 'cfg_denoised_callback', params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams):  # mirrors (cfg_after_cfg_callback)
    _run('cfg_after_cfg', 'cfg_after_cfg_callback', params)


def before_component_callback(component, **kwargs):  # mirrors (before_component_callback)
    for c in ordered_callbacks('before_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'before_component_callback')


def after_component_callback(component, **kwargs):  # mirrors (after_component_callback)
    for c in ordered_callbacks('after_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'after_component_callback')


def image_grid_callback(params: ImageGridLoopParams):  # mirrors (image_grid_callback)
    _run('image_grid', 'image_grid', params)


def infotext_pasted_callback(infotext: str, params: dict):  # mirrors (infotext_pasted_callback): params may be edited in place
    _run('infotext_pasted', 'infotext_pasted', infotext, params)


def script_unloaded_callback():  # mirrors (script_unloaded_callback): reverse order
    for c in reversed(ordered_callbacks('script_unloaded')):
        try:
            c.callback()
        except Exception:
            report_exception(c, 'script_unloaded')


def before_ui_callback():  # mirrors (before_ui_callback): reverse order
    for c in reversed(ordered_callbacks('before_ui')):
        try:
            c.callback()
        except Exception:
            report_exception(c, 'before_ui')


def before_token_counter_callback(params: BeforeTokenCounterParams):  # mirrors (before_token_counter_callback)
    _run('before_token_counter', 'before_token_counter', params)


def remove_current_script_callbacks():  # mirrors (remove_current_script_callbacks): removes those registered from the caller's file
    filename = _caller_file()
    if filename == 'unknown file':
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)
    for ordered_callbacks_list in ordered_callbacks_map.values():
        for callback_to_remove in [cb for cb in ordered_callbacks_list if cb.script == filename]:
            ordered_callbacks_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):  # mirrors (remove_callbacks_for_function): compares with ==
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)
    for ordered_callback_list in ordered_callbacks_map.values():
        for callback_to_remove in [cb for cb in ordered_callback_list if cb.callback == callback_func]:
            ordered_callback_list.remove(callback_to_remove)


def _register(category, callback, name):
    """Register under 'callbacks_<category>', naming the caller's file like add_callback does."""
    filename = _caller_file()
    add_callback(callback_map['callbacks_' + category], callback, name=name, category=category, filename=filename)


def on_app_started(callback, *, name=None):  # mirrors (on_app_started): callback(demo: gr.Blocks | None, app: FastAPI)
    _register('app_started', callback, name)


def on_before_reload(callback, *, name=None):  # mirrors (on_before_reload)
    _register('on_reload', callback, name)


def on_model_loaded(callback, *, name=None):  # mirrors (on_model_loaded): callback(sd_model)
    _register('model_loaded', callback, name)


def on_ui_tabs(callback, *, name=None):  # mirrors (on_ui_tabs)
    _register('ui_tabs', callback, name)


def on_ui_settings(callback, *, name=None):  # mirrors (on_ui_settings): add settings with shared.opts.add_option
    _register('ui_settings', callback, name)


def on_before_image_saved(callback, *, name=None):  # mirrors (on_before_image_saved)
    _register('before_image_saved', callback, name)


def on_image_saved(callback, *, name=None):  # mirrors (on_image_saved)
    _register('image_saved', callback, name)


def on_extra_noise(callback, *, name=None):  # mirrors (on_extra_noise)
    _register('extra_noise', callback, name)


def on_cfg_denoiser(callback, *, name=None):  # mirrors (on_cfg_denoiser): callback(CFGDenoiserParams), before the UNet calls
    _register('cfg_denoiser', callback, name)


def on_cfg_denoised(callback, *, name=None):  # mirrors (on_cfg_denoised): callback(CFGDenoisedParams), after the UNet calls
    _register('cfg_denoised', callback, name)


def on_cfg_after_cfg(callback, *, name=None):  # mirrors (on_cfg_after_cfg): callback(AfterCFGCallbackParams)
    _register('cfg_after_cfg', callback, name)


def on_before_component(callback, *, name=None):  # mirrors (on_before_component)
    _register('before_component', callback, name)


def on_after_component(callback, *, name=None):  # mirrors (on_after_component)
    _register('after_component', callback, name)


def on_image_grid(callback, *, name=None):  # mirrors (on_image_grid)
    _register('image_grid', callback, name)


def on_infotext_pasted(callback, *, name=None):  # mirrors (on_infotext_pasted): callback(infotext: str, params: dict)
    _register('infotext_pasted', callback, name)


def on_script_unloaded(callback, *, name=None):  # mirrors (on_script_unloaded)
    _register('script_unloaded', callback, name)


def on_before_ui(callback, *, name=None):  # mirrors (on_before_ui)
    _register('before_ui', callback, name)


def on_list_optimizers(callback, *, name=None):  # mirrors (on_list_optimizers)
    _register('list_optimizers', callback, name)


def on_list_unets(callback, *, name=None):  # mirrors (on_list_unets)
    _register('list_unets', callback, name)


def on_before_token_counter(callback, *, name=None):  # mirrors (on_before_token_counter)
    _register('before_token_counter', callback, name)
