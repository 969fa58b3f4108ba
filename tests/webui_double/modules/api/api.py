"""The HTTP API; mirrors modules/api/api.py: script-argument plumbing, /sdapi/v1/txt2img and /img2img.

`Api(app, queue_lock)` adds the routes to a FastAPI app like the WebUI; `Api()` (no app) only offers
the methods. Simplified: no auth, no infotext request key, no task queue/progress, PNG responses only,
and the routes the extension does not need are left out.
"""
import base64
import datetime
import io
import os
import threading
import time
from contextlib import closing

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import HTTPException  # the class v1.10.1's handler checks
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from PIL import Image

from modules import errors, scripts, sd_samplers, shared
from modules.api import models
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, process_images



def script_name_to_index(name, scripts_list):  # mirrors modules/api/api.py (script_name_to_index): case-insensitive title match
    try:
        return [script.title().lower() for script in scripts_list].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def validate_sampler_name(name):  # mirrors modules/api/api.py (validate_sampler_name)
    config = sd_samplers.all_samplers_map.get(name, None)
    if config is None:
        raise HTTPException(status_code=400, detail="Sampler not found")
    return name


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


def api_middleware(app: FastAPI):  # mirrors modules/api/api.py (api_middleware) of v1.10.1
    """Every exception becomes a JSON answer: status from the exception's `status_code` (500 when it
    has none); a traceback is printed for anything that is not a fastapi HTTPException (with rich's
    local variables when WEBUI_RICH_EXCEPTIONS is set and rich imports), nothing for those."""
    rich_available = False
    try:
        if os.environ.get('WEBUI_RICH_EXCEPTIONS', None) is not None:
            import anyio  # the WebUI imports these two only to keep them out of rich's frames
            import starlette
            from rich.console import Console
            console = Console()
            rich_available = True
    except Exception:
        pass

    @app.middleware("http")
    async def log_and_time(req: Request, call_next):  # mirrors (api_middleware.log_and_time)
        ts = time.time()
        res: Response = await call_next(req)
        duration = str(round(time.time() - ts, 4))
        res.headers["X-Process-Time"] = duration
        endpoint = req.scope.get('path', 'err')
        if shared.cmd_opts.api_log and endpoint.startswith('/sdapi'):
            print(f"API {datetime.datetime.now():%Y-%m-%d %H:%M:%S.%f} {res.status_code} {req.scope.get('scheme', 'err')}/"
                  f"{req.scope.get('http_version', '0.0')} {req.scope.get('method', 'err')} {endpoint} "
                  f"{req.scope.get('client', ('0:0.0.0', 0))[0]} {duration}")
        return res

    def handle_exception(request: Request, e: Exception):  # mirrors (api_middleware.handle_exception)
        err = {
            "error": type(e).__name__,
            "detail": vars(e).get('detail', ''),
            "body": vars(e).get('body', ''),
            "errors": str(e),
        }
        if not isinstance(e, HTTPException):  # the WebUI prints no traceback for HTTPExceptions
            message = f"API error: {request.method}: {request.url} {err}"
            if rich_available:
                print(message)
                console.print_exception(show_locals=True, max_frames=2, extra_lines=1, suppress=[anyio, starlette],
                                        word_wrap=False, width=min([console.width, 200]))
            else:
                errors.report(message, exc_info=True)
        return JSONResponse(status_code=vars(e).get('status_code', 500), content=jsonable_encoder(err))

    @app.middleware("http")
    async def exception_handling(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as e:
            return handle_exception(request, e)

    @app.exception_handler(Exception)
    async def fastapi_exception_handler(request: Request, e: Exception):
        return handle_exception(request, e)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, e: HTTPException):
        return handle_exception(request, e)


class Api:  # mirrors modules/api/api.py (Api)
    def __init__(self, app: FastAPI = None, queue_lock=None):  # mirrors (Api.__init__); app=None: methods only (double-only)
        self.app = app
        self.queue_lock = queue_lock if queue_lock is not None else threading.Lock()  # webui.py passes call_queue.queue_lock
        self.default_script_arg_txt2img = []
        self.default_script_arg_img2img = []
        if app is None:
            return
        api_middleware(self.app)
        self.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"], response_model=models.TextToImageResponse)
        self.add_api_route("/sdapi/v1/img2img", self.img2imgapi, methods=["POST"], response_model=models.ImageToImageResponse)
        self.add_api_route("/sdapi/v1/scripts", self.get_scripts_list, methods=["GET"], response_model=models.ScriptsList)
        self.add_api_route("/sdapi/v1/script-info", self.get_script_info, methods=["GET"], response_model=list[models.ScriptInfo])
        for runner, is_img2img in ((scripts.scripts_txt2img, False), (scripts.scripts_img2img, True)):
            if not runner.scripts:  # the WebUI calls ui.create_ui() here, which builds both runners
                runner.build_ui(is_img2img=is_img2img)
        self.default_script_arg_txt2img = self.init_default_script_args(scripts.scripts_txt2img)
        self.default_script_arg_img2img = self.init_default_script_args(scripts.scripts_img2img)

    def add_api_route(self, path: str, endpoint, **kwargs):  # mirrors (Api.add_api_route), no --api-auth
        return self.app.add_api_route(path, endpoint, **kwargs)

    def get_scripts_list(self):  # mirrors (Api.get_scripts_list)
        t2ilist = [script.name for script in scripts.scripts_txt2img.scripts if script.name is not None]
        i2ilist = [script.name for script in scripts.scripts_img2img.scripts if script.name is not None]
        return models.ScriptsList(txt2img=t2ilist, img2img=i2ilist)

    def get_script_info(self):  # mirrors (Api.get_script_info)
        res = []
        for script_list in [scripts.scripts_txt2img.scripts, scripts.scripts_img2img.scripts]:
            res += [script.api_info for script in script_list if script.api_info is not None]
        return res

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

    def text2imgapi(self, txt2imgreq: models.StableDiffusionTxt2ImgProcessingAPI):  # mirrors (Api.text2imgapi)
        script_runner = scripts.scripts_txt2img
        selectable_scripts, selectable_script_idx = self.get_selectable_script(txt2imgreq.script_name, script_runner)
        # .copy(update=...) as the real one: pydantic 1's name, still there (deprecated) in pydantic 2
        populate = txt2imgreq.copy(update={  # Override __init__ params
            "sampler_name": validate_sampler_name(txt2imgreq.sampler_name or txt2imgreq.sampler_index),
            "do_not_save_samples": not txt2imgreq.save_images,
            "do_not_save_grid": not txt2imgreq.save_images,
        })
        if populate.sampler_name:
            populate.sampler_index = None  # prevent a warning later on
        args = dict(vars(populate))
        args.pop('script_name', None)
        args.pop('script_args', None)  # will refeed them to the pipeline directly after initializing them
        args.pop('alwayson_scripts', None)
        args.pop('infotext', None)
        script_args = self.init_script_args(txt2imgreq, self.default_script_arg_txt2img, selectable_scripts, selectable_script_idx, script_runner)
        send_images = args.pop('send_images', True)
        args.pop('save_images', None)
        with self.queue_lock:
            with closing(StableDiffusionProcessingTxt2Img(sd_model=shared.sd_model, **args)) as p:
                p.is_api = True
                p.scripts = script_runner
                try:
                    shared.state.begin(job="scripts_txt2img")
                    if selectable_scripts is not None:
                        p.script_args = script_args
                        processed = scripts.scripts_txt2img.run(p, *p.script_args)  # Need to pass args as list here
                    else:
                        p.script_args = tuple(script_args)  # Need to pass args as tuple here
                        processed = process_images(p)
                finally:
                    shared.state.end()
                    shared.total_tqdm.clear()
        b64images = list(map(encode_pil_to_base64, processed.images)) if send_images else []
        return models.TextToImageResponse(images=b64images, parameters=vars(txt2imgreq), info=processed.js())

    def img2imgapi(self, img2imgreq: models.StableDiffusionImg2ImgProcessingAPI):  # mirrors (Api.img2imgapi)
        init_images = img2imgreq.init_images
        if init_images is None:
            raise HTTPException(status_code=404, detail="Init image not found")
        mask = img2imgreq.mask
        if mask:
            mask = decode_base64_to_image(mask)
        script_runner = scripts.scripts_img2img
        selectable_scripts, selectable_script_idx = self.get_selectable_script(img2imgreq.script_name, script_runner)
        populate = img2imgreq.copy(update={  # Override __init__ params
            "sampler_name": validate_sampler_name(img2imgreq.sampler_name or img2imgreq.sampler_index),
            "do_not_save_samples": not img2imgreq.save_images,
            "do_not_save_grid": not img2imgreq.save_images,
            "mask": mask,
        })
        if populate.sampler_name:
            populate.sampler_index = None  # prevent a warning later on
        args = dict(vars(populate))
        args.pop('include_init_images', None)
        args.pop('script_name', None)
        args.pop('script_args', None)  # will refeed them to the pipeline directly after initializing them
        args.pop('alwayson_scripts', None)
        args.pop('infotext', None)
        script_args = self.init_script_args(img2imgreq, self.default_script_arg_img2img, selectable_scripts, selectable_script_idx, script_runner)
        send_images = args.pop('send_images', True)
        args.pop('save_images', None)
        with self.queue_lock:
            with closing(StableDiffusionProcessingImg2Img(sd_model=shared.sd_model, **args)) as p:
                p.init_images = [decode_base64_to_image(x) for x in init_images]
                p.is_api = True
                p.scripts = script_runner
                try:
                    shared.state.begin(job="scripts_img2img")
                    if selectable_scripts is not None:
                        p.script_args = script_args
                        processed = scripts.scripts_img2img.run(p, *p.script_args)  # Need to pass args as list here
                    else:
                        p.script_args = tuple(script_args)  # Need to pass args as tuple here
                        processed = process_images(p)
                finally:
                    shared.state.end()
                    shared.total_tqdm.clear()
        b64images = list(map(encode_pil_to_base64, processed.images)) if send_images else []
        if not img2imgreq.include_init_images:
            img2imgreq.init_images = None
            img2imgreq.mask = None
        return models.ImageToImageResponse(images=b64images, parameters=vars(img2imgreq), info=processed.js())
