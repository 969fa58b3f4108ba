"""API schema; mirrors modules/api/models.py (request models generated from the processing classes).

The WebUI builds StableDiffusionTxt2ImgProcessingAPI / ...Img2Img... with PydanticModelGenerator
from the processing classes' __init__ parameters, minus API_NOT_ALLOWED, plus a few API-only keys
(script_name, script_args, alwayson_scripts, send_images, ...). The double does the same over its
own processing classes. The WebUI runs pydantic 1, where generate_model is the real one line for
line; the real function fails under pydantic 2 (`__config__` is gone: AttributeError), so there the
double sets the same two options through model_config (the test environment of Python 3.11 has
pydantic 2, the WebUI's own one pydantic 1: tests run under both).
"""
import inspect
from typing import Any, List, Optional

import pydantic
from pydantic import BaseModel, Field, create_model

from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img

PYDANTIC_V1 = pydantic.VERSION.startswith("1.")

API_NOT_ALLOWED = [  # mirrors modules/api/models.py (API_NOT_ALLOWED)
    "self",
    "kwargs",
    "sd_model",
    "outpath_samples",
    "outpath_grids",
    "sampler_index",
    "extra_generation_params",
    "overlay_images",
    "do_not_reload_embeddings",
    "seed_enable_extras",
    "prompt_for_display",
    "sampler_noise_scheduler_override",
    "ddim_discretize",
]

_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "tuple": tuple}


def _field_type(annotation):
    """Optional[the parameter's type]; the double's annotations are strings (from __future__)."""
    if isinstance(annotation, str):
        annotation = _SIMPLE_TYPES.get(annotation, Any)
    if annotation is inspect.Parameter.empty or annotation not in _SIMPLE_TYPES.values():
        annotation = Any
    return Optional[annotation]


class PydanticModelGenerator:  # mirrors modules/api/models.py (PydanticModelGenerator)
    def __init__(self, model_name=None, class_instance=None, additional_fields=None):
        parameters = {}
        for cls in [c for c in inspect.getmro(class_instance) if c is not object]:
            parameters = {**parameters, **inspect.signature(cls.__init__).parameters}
        self._model_name = model_name
        self._fields = {
            name: (_field_type(p.annotation), Field(default=None if p.default is inspect.Parameter.empty or isinstance(p.default, property) else p.default))
            for name, p in parameters.items() if name not in API_NOT_ALLOWED
        }
        # the real one names fields inflection.underscore(key) with the key as alias: the same name for
        # the double's snake_case keys, so no alias; "exclude" (response only) is not modelled
        for extra in additional_fields or []:
            self._fields[extra["key"]] = (extra["type"], Field(default=extra["default"]))

    def generate_model(self):  # mirrors (PydanticModelGenerator.generate_model)
        if PYDANTIC_V1:  # the real function
            model = create_model(self._model_name, **self._fields)
            model.__config__.allow_population_by_field_name = True
            model.__config__.allow_mutation = True
            return model
        # pydantic 2 spelling of the same options (mutation is its default there)
        return create_model(self._model_name, __config__=pydantic.ConfigDict(populate_by_name=True), **self._fields)


StableDiffusionTxt2ImgProcessingAPI = PydanticModelGenerator(  # mirrors modules/api/models.py
    "StableDiffusionProcessingTxt2Img",
    StableDiffusionProcessingTxt2Img,
    [
        {"key": "sampler_index", "type": str, "default": "Euler"},
        {"key": "script_name", "type": Optional[str], "default": None},
        {"key": "script_args", "type": list, "default": []},
        {"key": "send_images", "type": bool, "default": True},
        {"key": "save_images", "type": bool, "default": False},
        {"key": "alwayson_scripts", "type": dict, "default": {}},
        {"key": "force_task_id", "type": Optional[str], "default": None},
        {"key": "infotext", "type": Optional[str], "default": None},
    ],
).generate_model()

StableDiffusionImg2ImgProcessingAPI = PydanticModelGenerator(  # mirrors modules/api/models.py
    "StableDiffusionProcessingImg2Img",
    StableDiffusionProcessingImg2Img,
    [
        {"key": "sampler_index", "type": str, "default": "Euler"},
        {"key": "init_images", "type": Optional[list], "default": None},
        {"key": "denoising_strength", "type": float, "default": 0.75},
        {"key": "mask", "type": Optional[str], "default": None},
        {"key": "include_init_images", "type": bool, "default": False, "exclude": True},
        {"key": "script_name", "type": Optional[str], "default": None},
        {"key": "script_args", "type": list, "default": []},
        {"key": "send_images", "type": bool, "default": True},
        {"key": "save_images", "type": bool, "default": False},
        {"key": "alwayson_scripts", "type": dict, "default": {}},
        {"key": "force_task_id", "type": Optional[str], "default": None},
        {"key": "infotext", "type": Optional[str], "default": None},
    ],
).generate_model()


class TextToImageResponse(BaseModel):  # mirrors modules/api/models.py (TextToImageResponse)
    images: List[str] = Field(default=None, title="Image", description="The generated image in base64 format.")
    parameters: dict
    info: str


class ImageToImageResponse(BaseModel):  # mirrors modules/api/models.py (ImageToImageResponse)
    images: List[str] = Field(default=None, title="Image", description="The generated image in base64 format.")
    parameters: dict
    info: str


class ScriptsList(BaseModel):  # mirrors modules/api/models.py (ScriptsList)
    txt2img: list = Field(default=None, title="Txt2img", description="Titles of scripts (txt2img)")
    img2img: list = Field(default=None, title="Img2img", description="Titles of scripts (img2img)")


class ScriptArg(BaseModel):  # mirrors modules/api/models.py (ScriptArg)
    label: Optional[str] = Field(default=None, title="Label")
    value: Optional[Any] = Field(default=None, title="Value")
    minimum: Optional[Any] = Field(default=None, title="Minimum")
    maximum: Optional[Any] = Field(default=None, title="Maximum")
    step: Optional[Any] = Field(default=None, title="Minimum")
    choices: Optional[List[str]] = Field(default=None, title="Choices")


class ScriptInfo(BaseModel):  # mirrors modules/api/models.py (ScriptInfo)
    name: Optional[str] = Field(default=None, title="Name")
    is_alwayson: Optional[bool] = Field(default=None, title="IsAlwayson")
    is_img2img: Optional[bool] = Field(default=None, title="IsImg2img")
    args: List[ScriptArg] = Field(title="Arguments")
