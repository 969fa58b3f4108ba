"""User settings: one validated dataclass, built from the UI, the HTTP API or pasted infotext.

Every number the user sees is checked here once, with an error that names the field; the
sampling hot path then trusts these values.
"""

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ImageInputError, InputError
from .images import decode_base64, load_image

MAX_REGIONS = 4
MAX_PHRASE_CHARS = 200
DEFAULT_REGIONS = (("face", "face"), ("upper body", "upper body"), ("lower body", "lower body"))
FUSION_MODES = ("soft", "hard")
CROP_STYLES = ("strip", "box")
INFOTEXT_PREFIX = "Character-Adapter"
# accepted ranges of the numeric settings: the one source for validation, X/Y/Z and the sliders
RANGES = {
    "weight": (0.0, 2.0), "start": (0.0, 1.0), "end": (0.0, 1.0), "temperature": (1e-3, 10.0),
    "background": (0.0, 1.0), "timestep": (1, 999), "region_weight": (0.0, 2.0),
}


class ParamError(InputError):
    """A setting is missing, of the wrong type or out of range; `field` names it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"Character-Adapter: {field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Region:
    reference_phrase: str  # locates the region in the reference image
    phrase: str  # locates the region in the generated image
    weight: float = 1.0


@dataclass(frozen=True)
class Params:
    enabled: bool = False
    image: Any = None  # PIL image or numpy array (UI); base64 text or bytes (API) are decoded by validated()
    model: str = ""
    encoder: str = ""  # "" = the encoder that matches the adapter
    weight: float = 0.8
    start: float = 0.0
    end: float = 1.0
    fusion: str = "soft"
    temperature: float = 0.1
    background: float = 0.4
    timestep: int = 650
    crop: str = "strip"
    show_masks: bool = False
    # () = one region over the whole image: a plain IP-Adapter.
    regions: Tuple[Region, ...] = field(
        default_factory=lambda: tuple(Region(r, g) for r, g in DEFAULT_REGIONS)
    )

    def validated(self) -> "Params":
        """Return a copy with every field checked and normalised; raise ParamError otherwise."""
        regions = _validate_regions(self.regions)
        enabled = _as_bool("enabled", self.enabled)
        return replace(
            self,
            enabled=enabled,
            image=_as_image("image", self.image) if enabled else self.image,
            model=_as_name("model", self.model),
            encoder=_auto_encoder(_as_name("encoder", self.encoder)),
            weight=_as_float("weight", self.weight, *RANGES["weight"]),
            start=_as_float("start", self.start, *RANGES["start"]),
            end=_as_float("end", self.end, *RANGES["end"]),
            fusion=_as_choice("fusion", self.fusion, FUSION_MODES),
            temperature=_as_float("temperature", self.temperature, *RANGES["temperature"]),
            background=_as_float("background", self.background, *RANGES["background"]),
            timestep=_as_int("timestep", self.timestep, *RANGES["timestep"]),
            crop=_as_choice("crop", self.crop, CROP_STYLES),
            show_masks=_as_bool("show_masks", self.show_masks),
            regions=regions,
        )._check_window()

    def _check_window(self) -> "Params":
        if self.start >= self.end:
            raise ParamError("start", f"must be below end ({self.start} >= {self.end})")
        return self

    # ---- UI / API positional form ------------------------------------------------------

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "Params":
        """Build from the script's positional args (UI order) or from a dict in the first slot (API).

        The WebUI API copies the UI defaults into every slot and then the request's args from
        the first slot on, so `{"args": [{...}]}` arrives as the dict followed by 24 defaults:
        a dict first means the API form and the rest is ignored. A shorter positional list
        keeps the UI defaults for the missing values, as the API does.
        """
        args = list(args)
        if not args:
            return cls()
        if isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        if len(args) > len(ARG_NAMES):
            raise ParamError(
                "args",
                f"expected at most {len(ARG_NAMES)} positional values ({', '.join(ARG_NAMES)}) "
                f"or one dict, got {len(args)}",
            )
        args += UI_DEFAULT_ARGS[len(args):]
        values = dict(zip(ARG_NAMES, args))
        regions = []
        for slot in range(MAX_REGIONS):
            ref = values.pop(f"region{slot + 1}_reference_phrase")
            phrase = values.pop(f"region{slot + 1}_phrase")
            weight = values.pop(f"region{slot + 1}_weight")
            ref = _as_text(f"region {slot + 1} reference phrase", ref)
            if ref:
                phrase = _as_text(f"region {slot + 1} phrase", phrase) or ref
                regions.append(Region(ref, phrase, weight))
        return cls(regions=tuple(regions), **values).validated()

    def to_args(self) -> List[Any]:
        """The positional list in UI order (inverse of from_args)."""
        values = {name: getattr(self, name) for name in SCALAR_NAMES}
        for slot in range(MAX_REGIONS):
            region = self.regions[slot] if slot < len(self.regions) else Region("", "", 1.0)
            values[f"region{slot + 1}_reference_phrase"] = region.reference_phrase
            values[f"region{slot + 1}_phrase"] = region.phrase
            values[f"region{slot + 1}_weight"] = region.weight
        return [values[name] for name in ARG_NAMES]

    # ---- API dict form -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        """Build from the API's dict form; unknown keys are an error that names them."""
        unknown = sorted(str(key) for key in set(data) - set(DICT_KEYS))
        if unknown:
            raise ParamError(unknown[0], f"unknown key; accepted keys: {', '.join(DICT_KEYS)}")
        values = dict(data)
        for key, value in values.items():
            _check_api_type(key, value)
        values.setdefault("enabled", True)
        if "regions" in values:
            values["regions"] = _regions_from_json("regions", values["regions"], strict=True)
        params = cls(**values).validated()
        if params.enabled and params.image is None:
            raise ParamError("image", "required when enabled (base64 PNG/JPEG/WebP)")
        if params.enabled and not params.model:
            raise ParamError("model", "required when enabled: an adapter name from GET /character-adapter/models")
        return params

    # ---- X/Y/Z plot cells ------------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Params":
        """These settings with an X/Y/Z cell's values on top, validated like any other input.

        Keys are field names of OVERRIDABLE, plus "region_weights": one weight per region, in order.
        """
        if not overrides:
            return self
        values = dict(overrides)
        region_weights = values.pop("region_weights", None)
        unknown = sorted(set(values) - set(OVERRIDABLE))
        if unknown:
            raise ParamError(unknown[0], f"cannot be set per X/Y/Z cell; these can: {', '.join(OVERRIDABLE)}")
        params = replace(self, **values)
        if region_weights is not None:
            weights = tuple(region_weights)
            if len(weights) != len(params.regions):
                raise ParamError(
                    "region weights",
                    f"{len(weights)} weight(s) for {len(params.regions)} region(s) "
                    f"({', '.join(r.reference_phrase for r in params.regions) or 'none: the whole image'})",
                )
            params = replace(params, regions=tuple(
                replace(region, weight=weight) for region, weight in zip(params.regions, weights)))
        return params.validated()

    # ---- infotext ------------------------------------------------------------------------

    def to_infotext(self, image_hash: str) -> Dict[str, Any]:
        """Key/value pairs for p.extra_generation_params (the image as a short hash)."""
        p = INFOTEXT_PREFIX
        return {
            p: "on",
            f"{p} reference": image_hash,
            f"{p} model": self.model,
            f"{p} encoder": self.encoder or "auto",
            f"{p} weight": self.weight,
            f"{p} window": f"{self.start}-{self.end}",
            f"{p} fusion": self.fusion,
            f"{p} temperature": self.temperature,
            f"{p} background": self.background,
            f"{p} timestep": self.timestep,
            f"{p} crop": self.crop,
            f"{p} regions": json.dumps(
                [[r.reference_phrase, r.phrase, r.weight] for r in self.regions], ensure_ascii=False
            ),
        }

    @classmethod
    def from_infotext(cls, info: Mapping[str, Any]) -> Optional["Params"]:
        """Parse pasted generation parameters; None when the image did not use the adapter."""
        p = INFOTEXT_PREFIX
        if p not in info:
            return None
        start, _, end = str(info.get(f"{p} window", "0.0-1.0")).partition("-")
        encoder = str(info.get(f"{p} encoder", ""))
        values = dict(
            enabled=True,
            model=str(info.get(f"{p} model", "")),
            encoder="" if encoder == "auto" else encoder,
            weight=info.get(f"{p} weight", cls.weight),
            start=start,
            end=end,
            fusion=info.get(f"{p} fusion", cls.fusion),
            temperature=info.get(f"{p} temperature", cls.temperature),
            background=info.get(f"{p} background", cls.background),
            timestep=info.get(f"{p} timestep", cls.timestep),
            crop=info.get(f"{p} crop", cls.crop),
        )
        if f"{p} regions" in info:
            values["regions"] = _regions_from_json("regions", info[f"{p} regions"])
        return cls(**values).validated()


SCALAR_NAMES = (
    "enabled", "image", "model", "encoder", "weight", "start", "end", "fusion",
    "temperature", "background", "timestep", "crop", "show_masks",
)
ARG_NAMES = SCALAR_NAMES + tuple(
    f"region{slot}_{part}"
    for slot in range(1, MAX_REGIONS + 1)
    for part in ("reference_phrase", "phrase", "weight")
)
DICT_KEYS = SCALAR_NAMES + ("regions",)
# what an X/Y/Z axis may change per cell (besides "region_weights")
OVERRIDABLE = ("model", "weight", "start", "end", "fusion", "temperature", "timestep")
# the panel's defaults (ui() shows an empty generation phrase for "same as the reference"; both parse alike)
UI_DEFAULT_ARGS = tuple(Params().to_args())


# ---- field checks ---------------------------------------------------------------------------

_API_TYPES = {
    "enabled": (bool,), "show_masks": (bool,),
    "weight": (int, float), "start": (int, float), "end": (int, float),
    "temperature": (int, float), "background": (int, float), "timestep": (int, float),
    "model": (str,), "encoder": (str,), "fusion": (str,), "crop": (str,),
    "image": (str,), "regions": (list, tuple),
}


def _check_api_type(name: str, value: Any) -> None:
    """JSON types are strict in the API: "0.5" is not a number there."""
    allowed = _API_TYPES[name]
    if isinstance(value, bool) and bool not in allowed:
        raise ParamError(name, f"expected {_type_names(allowed)}, got {value!r}")
    if value is None and name in ("image",):
        return
    if not isinstance(value, allowed):
        raise ParamError(name, f"expected {_type_names(allowed)}, got {type(value).__name__}")


def _type_names(types: Sequence[type]) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "text",
             list: "a list", tuple: "a list"}
    return " or ".join(sorted({names[t] for t in types}))



def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "on", "off"):
        return value.strip().lower() in ("true", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ParamError(name, f"expected true or false, got {value!r}")


def _as_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise ParamError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ParamError(name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ParamError(name, f"must be between {low} and {high}, got {value!r}")
    return number


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    number = _as_float(name, value, low, high)
    if number != int(number):
        raise ParamError(name, f"expected a whole number, got {value!r}")
    return int(number)


def _as_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in choices:
        raise ParamError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return text


def _as_text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParamError(name, f"expected text, got {type(value).__name__}")
    text = " ".join(value.split())
    if len(text) > MAX_PHRASE_CHARS:
        raise ParamError(name, f"longer than {MAX_PHRASE_CHARS} characters ({len(text)})")
    return text


def _as_name(name: str, value: Any) -> str:
    """A model name as listed: no path separators, never a path to open."""
    text = _as_text(name, value)
    if "/" in text or "\\" in text or text.startswith(".") or "\x00" in text:
        raise ParamError(name, f"expected a model name from the list, got a path-like {text!r}")
    return text


def _as_image(name: str, value: Any) -> Any:
    """API images (base64 text, optionally a data:image/...;base64, URL) decoded to RGB; others as given.

    Text is never taken as a file path or fetched as a URL: it comes from HTTP clients.
    """
    if isinstance(value, str):
        value = _base64_payload(name, value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise ParamError(name, "the image data is empty (0 bytes)")
        try:
            return load_image(bytes(value))
        except ImageInputError as err:
            raise ParamError(name, f"cannot be decoded: {err}") from None
    return value


def _base64_payload(name: str, text: str) -> bytes:
    text = text.strip()
    if not text:
        raise ParamError(name, "empty; expected a base64 PNG/JPEG/WebP (a data:image/...;base64, prefix is allowed)")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.startswith("data:image/") or ";base64" not in header:
            raise ParamError(name, f"expected a data:image/...;base64, URL, got {header[:40]!r}")
    elif text.startswith(("http://", "https://")):
        raise ParamError(name, "URLs are not fetched; send the image itself as base64")
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")  # url-safe alphabet too
    if not compact:
        raise ParamError(name, "the data URL has no base64 payload")
    try:
        return decode_base64(compact, "the base64 text")
    except ImageInputError:
        raise ParamError(name, f"not base64 (starts with {compact[:20]!r}); file paths are not accepted") from None


def _auto_encoder(name: str) -> str:
    """The UI lists "Auto" among the encoders: it means the one the adapter needs ("")."""
    return "" if name.lower() == "auto" else name


def _regions_from_json(name: str, value: Any, strict: bool = False) -> Tuple[Region, ...]:
    """Regions from a list of dicts (API) or of [reference, phrase, weight] (infotext JSON).

    `strict` (the API): a weight must be a JSON number, as for the top-level numbers.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ParamError(name, f"expected a JSON list, got {value[:60]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise ParamError(name, f"expected a list of regions, got {type(value).__name__}")
    regions = []
    for index, item in enumerate(value):
        label = f"{name}[{index}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"reference_phrase", "phrase", "weight"})
            if unknown:
                raise ParamError(
                    f"{label}.{unknown[0]}",
                    "unknown key; accepted keys: reference_phrase, phrase, weight",
                )
            ref = _as_text(f"{label}.reference_phrase", item.get("reference_phrase"))
            phrase = _as_text(f"{label}.phrase", item.get("phrase")) or ref
            weight = item.get("weight", 1.0)
            if strict and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                raise ParamError(f"{label}.weight", f"expected a number, got {weight!r}")
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            ref = _as_text(f"{label}[0]", item[0])
            phrase = _as_text(f"{label}[1]", item[1]) or ref
            weight = item[2]
        else:
            raise ParamError(label, f"expected an object with reference_phrase, got {item!r}")
        if not ref:
            raise ParamError(f"{label}.reference_phrase", "must not be empty")
        regions.append(Region(ref, phrase, weight))
    return tuple(regions)


def _validate_regions(regions: Sequence[Region]) -> Tuple[Region, ...]:
    if len(regions) > MAX_REGIONS:
        raise ParamError("regions", f"at most {MAX_REGIONS} regions, got {len(regions)}")
    checked = []
    seen = {}
    for index, region in enumerate(regions):
        label = f"regions[{index}]"
        ref = _as_text(f"{label}.reference_phrase", region.reference_phrase)
        if not ref:
            raise ParamError(f"{label}.reference_phrase", "must not be empty")
        phrase = _as_text(f"{label}.phrase", region.phrase) or ref
        weight = _as_float(f"{label}.weight", region.weight, *RANGES["region_weight"])
        if ref.lower() in seen:
            raise ParamError(
                f"{label}.reference_phrase",
                f"{ref!r} is also region {seen[ref.lower()]}: each region needs its own phrase",
            )
        seen[ref.lower()] = index
        checked.append(Region(ref, phrase, weight))
    return tuple(checked)
