"""Script API and runner; mirrors modules/scripts.py.

Every ScriptRunner hook dispatcher calls each alwayson script that overrides the hook with
p.script_args[script.args_from:script.args_to], inside try/except: an exception is reported
(errors.report) and the next script runs; generation goes on. Only the selectable script's
run() and the UI-building calls differ (ui() failures are swallowed by wrap_call).
"""
import inspect
import os
import re
import sys
from collections import namedtuple
from dataclasses import dataclass
from typing import Any

from modules import paths, script_callbacks, script_loading, errors

AlwaysVisible = object()  # mirrors modules/scripts.py (AlwaysVisible)


class MaskBlendArgs:  # mirrors modules/scripts.py (MaskBlendArgs)
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:  # mirrors modules/scripts.py (PostSampleArgs)
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:  # mirrors modules/scripts.py (PostprocessImageArgs)
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:  # mirrors modules/scripts.py (PostProcessMaskOverlayArgs)
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:  # mirrors modules/scripts.py (PostprocessBatchListArgs)
    def __init__(self, images):
        self.images = images


@dataclass
class OnComponent:  # mirrors modules/scripts.py (OnComponent)
    component: Any


class Script:  # mirrors modules/scripts.py (Script)
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    def title(self):  # mirrors (Script.title)
        raise NotImplementedError()

    def ui(self, is_img2img):  # mirrors (Script.ui): returns the components whose values become *args
        pass

    def show(self, is_img2img):  # mirrors (Script.show): False, True (selectable) or AlwaysVisible
        return True

    def run(self, p, *args):  # mirrors (Script.run): selectable scripts only
        pass

    def setup(self, p, *args):  # mirrors (Script.setup): once, when p gets scripts and script_args
        pass

    def before_process(self, p, *args):  # mirrors (Script.before_process)
        pass

    def process(self, p, *args):  # mirrors (Script.process): before p.init, outside torch.no_grad
        pass

    def before_process_batch(self, p, *args, **kwargs):  # mirrors (Script.before_process_batch): kwargs batch_number, prompts, seeds, subseeds
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):  # mirrors (Script.after_extra_networks_activate)
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):  # mirrors (Script.process_before_every_sampling): kwargs x, noise, c, uc; twice with hires fix
        pass

    def process_batch(self, p, *args, **kwargs):  # mirrors (Script.process_batch): kwargs batch_number, prompts, seeds, subseeds
        pass

    def postprocess_batch(self, p, *args, **kwargs):  # mirrors (Script.postprocess_batch): kwargs images (B,3,H,W in [0,1]), batch_number
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):  # mirrors (Script.postprocess_batch_list)
        pass

    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):  # mirrors (Script.on_mask_blend)
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):  # mirrors (Script.post_sample)
        pass

    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):  # mirrors (Script.postprocess_image)
        pass

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):  # mirrors (Script.postprocess_maskoverlay)
        pass

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):  # mirrors (Script.postprocess_image_after_composite)
        pass

    def postprocess(self, p, processed, *args):  # mirrors (Script.postprocess): after Processed is built
        pass

    def before_component(self, component, **kwargs):  # mirrors (Script.before_component)
        pass

    def after_component(self, component, **kwargs):  # mirrors (Script.after_component)
        pass

    def on_before_component(self, callback, *, elem_id):  # mirrors (Script.on_before_component)
        if self.on_before_component_elem_id is None:
            self.on_before_component_elem_id = []
        self.on_before_component_elem_id.append((elem_id, callback))

    def on_after_component(self, callback, *, elem_id):  # mirrors (Script.on_after_component)
        if self.on_after_component_elem_id is None:
            self.on_after_component_elem_id = []
        self.on_after_component_elem_id.append((elem_id, callback))

    def describe(self):  # mirrors (Script.describe)
        return ""

    def elem_id(self, item_id):  # mirrors (Script.elem_id): 'script_[txt2img_|img2img_]<title>_<item_id>'
        need_tabname = self.show(True) == self.show(False)
        tabkind = 'img2img' if self.is_img2img else 'txt2img'
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    def before_hr(self, p, *args):  # mirrors (Script.before_hr)
        pass


current_basedir = paths.script_path  # mirrors modules/scripts.py (current_basedir)


def basedir():  # mirrors modules/scripts.py (basedir): the extension folder while its scripts are being imported
    return current_basedir


ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])  # mirrors modules/scripts.py
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])  # mirrors modules/scripts.py
scripts_data = []  # mirrors modules/scripts.py (scripts_data): one entry per Script class found while loading
postprocessing_scripts_data = []  # mirrors modules/scripts.py (postprocessing_scripts_data)


def load_scripts(script_files=()):  # mirrors modules/scripts.py (load_scripts); the double takes (basedir, path) pairs instead of scanning folders
    """Clear all callbacks, import each file with script_loading.load_module, record its Script classes,
    and create fresh scripts_txt2img / scripts_img2img runners. The WebUI loads its own scripts/ first
    (xyz_grid.py among them), then extensions in folder-name order."""
    global current_basedir, scripts_txt2img, scripts_img2img
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()

    syspath = sys.path
    for base, path in script_files:
        scriptfile = ScriptFile(base, os.path.basename(path), path)
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            module = script_loading.load_module(scriptfile.path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
        except Exception:
            errors.report(f"Error loading script: {scriptfile.filename}", exc_info=True)
        finally:
            sys.path = syspath
            current_basedir = paths.script_path

    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):  # mirrors modules/scripts.py (wrap_call)
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:  # mirrors modules/scripts.py (ScriptRunner)
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.callback_map = {}
        self.on_before_component_elem_id = {}
        self.on_after_component_elem_id = {}

    def initialize_scripts(self, is_img2img):  # mirrors (ScriptRunner.initialize_scripts): one instance per tab
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)
        self.callback_map.clear()

    def create_script_ui(self, script):  # mirrors (ScriptRunner.create_script_ui): a failing ui() is reported, not raised
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        try:
            self.create_script_ui_inner(script)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def create_script_ui_inner(self, script):  # mirrors (ScriptRunner.create_script_ui_inner)
        import modules.api.models as api_models
        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        api_args = []
        for control in controls:
            control.custom_script_source = os.path.basename(script.filename)
            arg_info = api_models.ScriptArg(label=control.label or "")
            for field in ("value", "minimum", "maximum", "step"):
                v = getattr(control, field, None)
                if v is not None:
                    setattr(arg_info, field, v)
            choices = getattr(control, 'choices', None)
            if choices is not None:
                arg_info.choices = [x[0] if isinstance(x, tuple) else x for x in choices]
            api_args.append(arg_info)
        script.api_info = api_models.ScriptInfo(name=script.name, is_img2img=script.is_img2img, is_alwayson=script.alwayson, args=api_args)
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):  # mirrors (ScriptRunner.setup_ui_for_section)
        import gradio as gr
        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def prepare_ui(self):  # mirrors (ScriptRunner.prepare_ui)
        self.inputs = [None]

    def setup_ui(self):  # mirrors (ScriptRunner.setup_ui); inputs[0] (the script dropdown) stays None in the double
        all_titles = [wrap_call(script.title, script.filename, "title") or script.filename for script in self.scripts]
        self.title_map = {title.lower(): script for title, script in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(script.title, script.filename, "title") or f"{script.filename} [error]" for script in self.selectable_scripts]
        self.setup_ui_for_section(None)
        self.setup_ui_for_section(None, self.selectable_scripts)
        return self.inputs

    def build_ui(self, is_img2img):  # double-only: initialize + prepare + setup inside a gr.Blocks, like ui.create_ui
        import gradio as gr
        from modules import gradio_extensons  # noqa: F401  the WebUI always has these patches on
        self.initialize_scripts(is_img2img)
        with gr.Blocks():
            self.prepare_ui()
            for script in self.alwayson_scripts:  # sections other than None are built elsewhere in ui.py; build them too
                if script.section is not None:
                    self.setup_ui_for_section(script.section, [script])
            self.setup_ui()
        return self.inputs

    def run(self, p, *args):  # mirrors (ScriptRunner.run): args[0] is 1 + the selectable script's index, 0 = none
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def list_scripts_for_method(self, method_name):  # mirrors (ScriptRunner.list_scripts_for_method)
        if method_name in ('before_component', 'after_component'):
            return self.scripts
        return self.alwayson_scripts

    def create_ordered_callbacks_list(self, method_name, *, enable_user_sort=True):  # mirrors (...create_ordered_callbacks_list): only scripts overriding the method
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        callbacks = []
        for script in script_list:
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            script_callbacks.add_callback(callbacks, script, category=category, name=script.__class__.__name__, filename=script.filename)
        return script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)

    def ordered_callbacks(self, method_name, *, enable_user_sort=True):  # mirrors (ScriptRunner.ordered_callbacks)
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        scrpts_len, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or scrpts_len != len(script_list):
            callbacks = self.create_ordered_callbacks_list(method_name, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    def ordered_scripts(self, method_name):  # mirrors (ScriptRunner.ordered_scripts)
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _dispatch(self, p, method_name, label, call):
        """Run `call(script, its args slice)` for every script overriding method_name; report errors and go on."""
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                call(script, script_args)
            except Exception:
                errors.report(f"Error running {label}: {script.filename}", exc_info=True)

    def before_process(self, p):  # mirrors (ScriptRunner.before_process)
        self._dispatch(p, 'before_process', 'before_process', lambda s, a: s.before_process(p, *a))

    def process(self, p):  # mirrors (ScriptRunner.process)
        self._dispatch(p, 'process', 'process', lambda s, a: s.process(p, *a))

    def process_before_every_sampling(self, p, **kwargs):  # mirrors (ScriptRunner.process_before_every_sampling)
        self._dispatch(p, 'process_before_every_sampling', 'process_before_every_sampling', lambda s, a: s.process_before_every_sampling(p, *a, **kwargs))

    def before_process_batch(self, p, **kwargs):  # mirrors (ScriptRunner.before_process_batch)
        self._dispatch(p, 'before_process_batch', 'before_process_batch', lambda s, a: s.before_process_batch(p, *a, **kwargs))

    def after_extra_networks_activate(self, p, **kwargs):  # mirrors (ScriptRunner.after_extra_networks_activate)
        self._dispatch(p, 'after_extra_networks_activate', 'after_extra_networks_activate', lambda s, a: s.after_extra_networks_activate(p, *a, **kwargs))

    def process_batch(self, p, **kwargs):  # mirrors (ScriptRunner.process_batch)
        self._dispatch(p, 'process_batch', 'process_batch', lambda s, a: s.process_batch(p, *a, **kwargs))

    def postprocess(self, p, processed):  # mirrors (ScriptRunner.postprocess)
        self._dispatch(p, 'postprocess', 'postprocess', lambda s, a: s.postprocess(p, processed, *a))

    def postprocess_batch(self, p, images, **kwargs):  # mirrors (ScriptRunner.postprocess_batch)
        self._dispatch(p, 'postprocess_batch', 'postprocess_batch', lambda s, a: s.postprocess_batch(p, *a, images=images, **kwargs))

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):  # mirrors (ScriptRunner.postprocess_batch_list)
        self._dispatch(p, 'postprocess_batch_list', 'postprocess_batch_list', lambda s, a: s.postprocess_batch_list(p, pp, *a, **kwargs))

    def post_sample(self, p, ps: PostSampleArgs):  # mirrors (ScriptRunner.post_sample)
        self._dispatch(p, 'post_sample', 'post_sample', lambda s, a: s.post_sample(p, ps, *a))

    def on_mask_blend(self, p, mba: MaskBlendArgs):  # mirrors (ScriptRunner.on_mask_blend)
        self._dispatch(p, 'on_mask_blend', 'post_sample', lambda s, a: s.on_mask_blend(p, mba, *a))

    def postprocess_image(self, p, pp: PostprocessImageArgs):  # mirrors (ScriptRunner.postprocess_image)
        self._dispatch(p, 'postprocess_image', 'postprocess_image', lambda s, a: s.postprocess_image(p, pp, *a))

    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs):  # mirrors (ScriptRunner.postprocess_maskoverlay)
        self._dispatch(p, 'postprocess_maskoverlay', 'postprocess_image', lambda s, a: s.postprocess_maskoverlay(p, ppmo, *a))

    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs):  # mirrors (ScriptRunner.postprocess_image_after_composite)
        self._dispatch(p, 'postprocess_image_after_composite', 'postprocess_image_after_composite', lambda s, a: s.postprocess_image_after_composite(p, pp, *a))

    def before_hr(self, p):  # mirrors (ScriptRunner.before_hr)
        self._dispatch(p, 'before_hr', 'before_hr', lambda s, a: s.before_hr(p, *a))

    def setup_scrips(self, p, *, is_ui=True):  # mirrors (ScriptRunner.setup_scrips) [sic]
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def script(self, title):  # mirrors (ScriptRunner.script)
        return self.title_map.get(title.lower())


scripts_txt2img: ScriptRunner = None  # mirrors modules/scripts.py (scripts_txt2img)
scripts_img2img: ScriptRunner = None  # mirrors modules/scripts.py (scripts_img2img)
scripts_current: ScriptRunner = None  # mirrors modules/scripts.py (scripts_current)
