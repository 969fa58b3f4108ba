"""X/Y/Z plot stand-in; mirrors scripts/xyz_grid.py of the WebUI (a selectable Script, loaded as module 'xyz_grid.py').

Extensions find this module through modules.scripts.scripts_data (script_class.__module__ ==
'xyz_grid.py') and append AxisOption objects to its `axis_options` list before its ui() runs:
ui() snapshots the list into self.current_axis_options, and the UI's axis dropdowns are
type="index" into that snapshot. Each cell runs process_images on a shallow copy(p).

Simplified: no range syntax (1-5, 1-5 (+2), 1-5 [3]), no grid image, no settings restore helper.
"""
import csv
from copy import copy
from io import StringIO
from itertools import chain, permutations
import os.path

import modules.scripts as scripts
from modules import errors, processing, shared
from modules.processing import process_images, Processed


def apply_field(field):  # mirrors scripts/xyz_grid.py (apply_field)
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def apply_prompt(p, x, xs):  # mirrors scripts/xyz_grid.py (apply_prompt)
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def apply_override(field, boolean: bool = False):  # mirrors scripts/xyz_grid.py (apply_override)
    def fun(p, x, xs):
        if boolean:
            x = True if x.lower() == "true" else False
        p.override_settings[field] = x
    return fun


def boolean_choice(reverse: bool = False):  # mirrors scripts/xyz_grid.py (boolean_choice)
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]
    return choice


def format_value_add_label(p, opt, x):  # mirrors scripts/xyz_grid.py (format_value_add_label)
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_value(p, opt, x):  # mirrors scripts/xyz_grid.py (format_value)
    if type(x) == float:
        x = round(x, 8)
    return x


def format_value_join_list(p, opt, x):  # mirrors scripts/xyz_grid.py (format_value_join_list)
    return ", ".join(x)


def do_nothing(p, x, xs):  # mirrors scripts/xyz_grid.py (do_nothing)
    pass


def format_nothing(p, opt, x):  # mirrors scripts/xyz_grid.py (format_nothing)
    return ""


def format_remove_path(p, opt, x):  # mirrors scripts/xyz_grid.py (format_remove_path)
    return os.path.basename(x)


def str_permutations(x):  # mirrors scripts/xyz_grid.py (str_permutations)
    return x


def list_to_csv_string(data_list):  # mirrors scripts/xyz_grid.py (list_to_csv_string)
    with StringIO() as o:
        csv.writer(o).writerow(data_list)
        return o.getvalue().strip()


def csv_string_to_list_strip(data_str):  # mirrors scripts/xyz_grid.py (csv_string_to_list_strip)
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


class AxisOption:  # mirrors scripts/xyz_grid.py (AxisOption)
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):  # mirrors scripts/xyz_grid.py (AxisOptionImg2Img)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):  # mirrors scripts/xyz_grid.py (AxisOptionTxt2Img)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [  # mirrors scripts/xyz_grid.py (axis_options): the first entries, same labels and order
    AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Var. seed", int, apply_field("subseed")),
    AxisOption("Var. strength", float, apply_field("subseed_strength")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
    AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
    AxisOption("Prompt S/R", str, apply_prompt, format_value=format_value),
    AxisOption("Negative Guidance minimum sigma", float, apply_field("s_min_uncond")),
    AxisOption("Clip skip", int, apply_override('CLIP_stop_at_last_layers')),
    AxisOption("Denoising", float, apply_field("denoising_strength")),
]


class Script(scripts.Script):  # mirrors scripts/xyz_grid.py (Script)
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):  # mirrors (Script.ui): snapshot of axis_options; same 18 controls in the same order
        import gradio as gr
        self.current_axis_options = [x for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]
        labels = [x.label for x in self.current_axis_options]
        controls = []
        for axis, default in (("x", 1), ("y", 0), ("z", 0)):
            controls.append(gr.Dropdown(label=f"{axis.upper()} type", choices=labels, value=labels[default], type="index", elem_id=self.elem_id(f"{axis}_type")))
            controls.append(gr.Textbox(label=f"{axis.upper()} values", lines=1, elem_id=self.elem_id(f"{axis}_values")))
            controls.append(gr.Dropdown(label=f"{axis.upper()} values", visible=False, multiselect=True, interactive=True))
        draw_legend = gr.Checkbox(label='Draw legend', value=True)
        include_lone_images = gr.Checkbox(label='Include Sub Images', value=False)
        include_sub_grids = gr.Checkbox(label='Include Sub Grids', value=False)
        no_fixed_seeds = gr.Checkbox(label='Keep -1 for seeds', value=False)
        vary_seeds = [gr.Checkbox(label=f'Vary seeds for {a}', value=False) for a in "XYZ"]
        margin_size = gr.Slider(label="Grid margins (px)", minimum=0, maximum=500, value=0, step=2)
        csv_mode = gr.Checkbox(label='Use text inputs instead of dropdowns', value=False)
        return controls + [draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, *vary_seeds, margin_size, csv_mode]

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode):  # mirrors (Script.run)
        x_type, y_type, z_type = x_type or 0, y_type or 0, z_type or 0
        if not no_fixed_seeds:
            processing.fix_seed(p)

        def process_axis(opt, vals, vals_dropdown):
            if opt.label == 'Nothing':
                return [0]
            if opt.choices is not None and not csv_mode:
                valslist = vals_dropdown
            elif opt.prepare is not None:
                valslist = opt.prepare(vals)
            else:
                valslist = csv_string_to_list_strip(vals)
            if opt.type == str_permutations:
                valslist = list(permutations(valslist))
            valslist = [opt.type(x) for x in valslist]
            if opt.confirm:
                opt.confirm(p, valslist)
            return valslist

        x_opt = self.current_axis_options[x_type]
        y_opt = self.current_axis_options[y_type]
        z_opt = self.current_axis_options[z_type]
        xs = process_axis(x_opt, x_values, x_values_dropdown)
        ys = process_axis(y_opt, y_values, y_values_dropdown)
        zs = process_axis(z_opt, z_values, z_values_dropdown)

        images, infotexts = [], []
        for iz, z in enumerate(zs):
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    if shared.state.interrupted or shared.state.stopping_generation:
                        break
                    pc = copy(p)  # shallow: extra_generation_params, override_settings, script_args are shared with p
                    pc.styles = pc.styles[:]
                    x_opt.apply(pc, x, xs)
                    y_opt.apply(pc, y, ys)
                    z_opt.apply(pc, z, zs)
                    try:
                        res = process_images(pc)
                    except Exception as e:
                        errors.display(e, "generating image for xyz plot")
                        res = Processed(p, [], p.seed, "")
                    images += res.images
                    infotexts += res.infotexts
        return Processed(p, images, p.seed, infotexts[0] if infotexts else "", infotexts=infotexts)
