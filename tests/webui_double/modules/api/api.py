"""How the HTTP API fills script args; mirrors modules/api/api.py (Api methods as a small class, no FastAPI app)."""
import base64
import io

from fastapi import HTTPException
from PIL import Image



def script_name_to_index(name, scripts_list):  # mirrors modules/api/api.py (script_name_to_index): case-insensitive title match
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def decode_base64_to_image(encoding):  # mirrors modules/api/api.py (decode_base64_to_image); URLs not supported in the double
    """Raw base64 or a 'data:image/...;base64,' URL -> PIL image. The API calls this for init_images/mask only, never for script args."""
    if encoding.startswith("data:image/"):
        encoding = encoding.split(";")[1].split(",")[1]
    try:
        return Image.open(io.BytesIO(base64.b64decode(encoding)))
    except Exception as e:
        raise HTTPException(status_code=500, detail="Invalid encoded image") from e


def encode_pil_to_base64(image):  # mirrors modules/api/api.py (encode_pil_to_base64), PNG only
    with io.BytesIO() as output_bytes:
        if isinstance(image, str):
            return image
        image.save(output_bytes, format="PNG")
        return base64.b64encode(output_bytes.getvalue())


class Api:  # mirrors modules/api/api.py (Api): only the script-argument plumbing
    def __init__(self):
        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []

    def get_selectable_script(self, script_name, script_runner):  # mirrors (Api.get_selectable_script)
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[script_idx], script_idx

    def get_script(self, script_name, script_runner):  # mirrors (Api.get_script): by title(), over all scripts
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.scripts)
        return script_runner.scripts[script_idx]

    def init_default_script_args(self, script_runner):  # mirrors (Api.init_default_script_args): calls ui() AGAIN (twice per script) for .value defaults
        import gradio as gr
        last_arg_index = 1
        for script in script_runner.scripts:
            if last_arg_index < script.args_to:
                last_arg_index = script.args_to
        script_args = [None] * last_arg_index
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    ui_default_values = []
                    for elem in script.ui(script.is_img2img):
                        ui_default_values.append(elem.value)
                    script_args[script.args_from:script.args_to] = ui_default_values
        return script_args

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *, input_script_args=None):  # mirrors (Api.init_script_args)
        """Copy the defaults, then alwayson_scripts[title]['args'][i] -> slot args_from + i (extra items ignored).
        `request` needs .script_args and .alwayson_scripts (a dict)."""
        script_args = default_script_args.copy()
        if input_script_args is not None:
            for index, value in input_script_args.items():
                script_args[index] = value
        if selectable_scripts:
            script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request.script_args
            script_args[0] = selectable_idx + 1
        if request.alwayson_scripts:
            for alwayson_script_name in request.alwayson_scripts.keys():
                alwayson_script = self.get_script(alwayson_script_name, script_runner)
                if alwayson_script is None:
                    raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
                if alwayson_script.alwayson is False:
                    raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
                if "args" in request.alwayson_scripts[alwayson_script_name]:
                    args = request.alwayson_scripts[alwayson_script_name]["args"]
                    for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(args))):
                        script_args[alwayson_script.args_from + idx] = args[idx]
        return script_args
