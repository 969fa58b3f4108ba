"""Infotext parsing and pasting; mirrors modules/infotext_utils.py (styles and hires defaults left out)."""
import json
import re

from modules import script_callbacks, errors

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'  # mirrors (re_param_code): keys are word chars, spaces, '-', '/'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")  # mirrors (re_imagesize): 'Key: 12x34' becomes 'Key-1', 'Key-2'
type_of_gr_update = dict  # mirrors (type_of_gr_update = type(gr.update())): gradio 3.41's update is a dict


class PasteField(tuple):  # mirrors modules/infotext_utils.py (PasteField): (component, label-or-callable)
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


def quote(text):  # mirrors (quote): JSON-quote values containing ',', ':' or a newline
    if ',' not in str(text) and '\n' not in str(text) and ':' not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):  # mirrors (unquote)
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields=None):  # mirrors (parse_generation_parameters): all values are strings
    """'prompt\\nNegative prompt: ..\\nK: v, K2: "quoted, v"' -> {'Prompt':.., 'Negative prompt':.., 'K': 'v', ...}."""
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f"Error parsing \"{k}: {v}\"")
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    if "Clip skip" not in res:
        res["Clip skip"] = "1"
    for key in skip_fields or []:
        res.pop(key, None)
    return res


def paste_values(paste_fields, infotext):  # double-only: the value each component would get, as connect_paste's paste_func computes it
    """None means 'leave the component as it is' (gr.update()); bool fields get False only from the text 'False';
    a gr.update(...) dict a paste function returns is passed on as it is (connect_paste: isinstance(v, type_of_gr_update))."""
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    res = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key, None)
        if v is None:
            res.append(None)
        elif isinstance(v, type_of_gr_update):
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                if valtype == bool and v == "False":
                    val = False
                elif valtype == int:
                    val = float(v)
                else:
                    val = valtype(v)
                res.append(val)
            except Exception:
                res.append(None)
    return res
