"""User settings: one validated dataclass, built from the UI, the HTTP API or pasted infotext.

Every number the user sees is checked here once, with an error that names the field; the
sampling hot path then trusts these values.
"""

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ImageInputError, InputError
from .images import decode_base64, load_image

MAX_REGIONS = 4
MAX_CHARACTERS = 8  # character units: the panel shows Settings' number of them (default DEFAULT_UNITS)
DEFAULT_UNITS = 3
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

Naming = Callable[[str], str]  # a field's name as the user should read it in a message


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


def _default_regions() -> Tuple[Region, ...]:
    return tuple(Region(r, g) for r, g in DEFAULT_REGIONS)


@dataclass(frozen=True)
class Character:
    """One character: its reference, adapter, strength, window, its regions and the prompt words
    that name it (`subject`: needed once there are two or more characters)."""

    image: Any = None  # PIL image or numpy array (UI); base64 text or bytes (API) are decoded by validated()
    model: str = ""
    encoder: str = ""  # "" = the encoder that matches the adapter
    weight: float = 0.8
    start: float = 0.0
    end: float = 1.0
    subject: str = ""
    # () = one region over the whole image (or figure): a plain IP-Adapter.
    regions: Tuple[Region, ...] = field(default_factory=_default_regions)
    unit: int = 1  # the panel's tab it comes from (1-based): names it in messages and in the infotext

    @property
    def label(self) -> str:
        return f"Character {self.unit}"

    def validated(self, enabled: bool, name: Naming = str) -> "Character":
        """A copy with every field checked and normalised; errors name fields through `name`."""
        regions = _validate_regions(self.regions, name)  # before the image: the cheaper checks first
        checked = replace(
            self,
            image=_as_image(name("image"), self.image) if enabled else self.image,
            model=_as_name(name("model"), self.model),
            encoder=_auto_encoder(_as_name(name("encoder"), self.encoder)),
            weight=_as_float(name("weight"), self.weight, *RANGES["weight"]),
            start=_as_float(name("start"), self.start, *RANGES["start"]),
            end=_as_float(name("end"), self.end, *RANGES["end"]),
            subject=_as_text(name("subject"), self.subject),
            regions=regions,
        )
        if checked.start >= checked.end:
            raise ParamError(name("start"), f"must be below end ({checked.start} >= {checked.end})")
        return checked


SHARED_NAMES = ("enabled", "fusion", "temperature", "background", "timestep", "crop", "show_masks")
CHARACTER_NAMES = ("image", "model", "encoder", "weight", "start", "end", "subject", "regions")


def _ui_naming(character: Character, several: bool) -> Naming:
    """Names in the panel's words: "weight" alone, or "Character 2: weight" once it matters which."""
    if not several and character.unit == 1:
        return str
    return lambda name: f"{character.label}: {name}"


@dataclass(frozen=True)
class Params:
    """The whole panel: the characters in use (at least one, in tab order) and the settings they share."""

    enabled: bool = False
    characters: Tuple[Character, ...] = (Character(),)
    fusion: str = "soft"
    temperature: float = 0.1
    background: float = 0.4
    timestep: int = 650
    crop: str = "strip"
    show_masks: bool = False

    @classmethod
    def single(cls, **values: Any) -> "Params":
        """One character (unit 1) from its fields mixed with the shared ones: Params.single(image=..., fusion=...)."""
        shared = {k: values.pop(k) for k in SHARED_NAMES if k in values}
        return cls(characters=(Character(**values),), **shared)

    @property
    def first(self) -> Character:
        """The first character in use (the only one in a single-character generation)."""
        return self.characters[0]

    def validated(self, naming: Optional[Callable[[int, Character], Naming]] = None) -> "Params":
        """Return a copy with every field checked and normalised; raise ParamError otherwise.

        `naming(index, character)` gives the names of a character's fields in messages (default:
        the panel's words, "Character 2: weight" when there are several characters).
        """
        enabled = _as_bool("enabled", self.enabled)
        characters = tuple(self.characters)
        if not characters:
            raise ParamError("characters", "at least one character is needed")
        if len(characters) > MAX_CHARACTERS:
            raise ParamError("characters", f"at most {MAX_CHARACTERS} characters, got {len(characters)}")
        units = [c.unit for c in characters]
        if units != sorted(set(units)) or not 1 <= units[0] <= units[-1] <= MAX_CHARACTERS:
            raise ParamError("characters", f"units must be distinct, increasing and within 1-{MAX_CHARACTERS}, "
                                           f"got {units}")
        several = len(characters) > 1
        names = [naming(i, c) if naming else _ui_naming(c, several) for i, c in enumerate(characters)]
        checked = tuple(c.validated(enabled, name) for c, name in zip(characters, names))
        if several:
            _check_subjects(checked, names)
        return replace(
            self,
            enabled=enabled,
            characters=checked,
            fusion=_as_choice("fusion", self.fusion, FUSION_MODES),
            temperature=_as_float("temperature", self.temperature, *RANGES["temperature"]),
            background=_as_float("background", self.background, *RANGES["background"]),
            timestep=_as_int("timestep", self.timestep, *RANGES["timestep"]),
            crop=_as_choice("crop", self.crop, CROP_STYLES),
            show_masks=_as_bool("show_masks", self.show_masks),
        )

    # ---- UI / API positional form ------------------------------------------------------

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "Params":
        """Build from the script's positional args (UI order) or from dicts in the first slots (API).

        The WebUI API copies the UI defaults into every slot and then the request's args from
        the first slot on, so `{"args": [{...}, {...}]}` arrives as the dicts followed by UI
        defaults: dicts first mean the API form (one per character) and the rest is ignored. A
        shorter positional list keeps the UI defaults for the missing values, as the API does;
        today's 25 values (one character) are its start. A unit without an image is off.
        """
        args = list(args)
        if not args:
            return cls()
        if isinstance(args[0], Mapping):
            dicts = []
            for value in args:
                if not isinstance(value, Mapping):
                    break
                dicts.append(value)
            stray = [i for i in range(len(dicts), len(args)) if isinstance(args[i], Mapping)]
            if stray:
                raise ParamError(f"args[{stray[0]}]", "a dict after positional values; send one dict per "
                                                      "character, all of them first")
            return cls.from_dicts(dicts)
        limit = len(arg_names(MAX_CHARACTERS))
        if len(args) > limit:
            raise ParamError(
                "args",
                f"expected at most {limit} positional values ({len(ARG_NAMES_ONE)} for the first character and "
                f"the shared settings, {UNIT_ARGS} more per further character) or dicts, got {len(args)}",
            )
        units = _units_for(len(args))
        names = arg_names(units)
        args += default_args(units)[len(args):]
        values = dict(zip(names, args))
        shared = {name: values.pop(name) for name in SHARED_NAMES}
        characters = []
        for unit in range(1, units + 1):
            prefix = _unit_prefix(unit)
            fields = {part: values.pop(prefix + part) for part in UNIT_PARTS}
            regions = []
            for slot in range(1, MAX_REGIONS + 1):
                ref = values.pop(f"{prefix}region{slot}_reference_phrase")
                phrase = values.pop(f"{prefix}region{slot}_phrase")
                weight = values.pop(f"{prefix}region{slot}_weight")
                label = f"{'' if unit == 1 else f'Character {unit}: '}region {slot}"
                ref = _as_text(f"{label} reference phrase", ref)
                if ref:
                    phrase = _as_text(f"{label} phrase", phrase) or ref
                    regions.append(Region(ref, phrase, weight))
            characters.append(Character(regions=tuple(regions), unit=unit, **fields))
        used = tuple(c for c in characters if c.image is not None) or (characters[0],)
        return cls(characters=used, **shared).validated()

    def to_args(self, units: Optional[int] = None) -> List[Any]:
        """The positional list in UI order for `units` tabs (default: DEFAULT_UNITS, or as many as the
        highest unit in use); inverse of from_args."""
        units = max(units or DEFAULT_UNITS, self.characters[-1].unit)
        values = {name: getattr(self, name) for name in SHARED_NAMES}
        by_unit = {c.unit: c for c in self.characters}
        for unit in range(1, units + 1):
            prefix = _unit_prefix(unit)
            character = by_unit.get(unit, Character())
            for part in UNIT_PARTS:
                values[prefix + part] = getattr(character, part)
            for slot in range(MAX_REGIONS):
                region = character.regions[slot] if slot < len(character.regions) else Region("", "", 1.0)
                values[f"{prefix}region{slot + 1}_reference_phrase"] = region.reference_phrase
                values[f"{prefix}region{slot + 1}_phrase"] = region.phrase
                values[f"{prefix}region{slot + 1}_weight"] = region.weight
        return [values[name] for name in arg_names(units)]

    # ---- API dict form -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        """Build from the API's dict form (one character); unknown keys are an error that names them."""
        return cls.from_dicts([data])

    @classmethod
    def from_dicts(cls, dicts: Sequence[Mapping[str, Any]]) -> "Params":
        """One dict per character, in order. Shared settings come from the first; another dict may
        repeat them only with the same value. With several dicts, fields are named `args[i].key`."""
        if not dicts:
            raise ParamError("args", "expected at least one dict")
        if len(dicts) > MAX_CHARACTERS:
            raise ParamError("args", f"at most {MAX_CHARACTERS} characters (dicts), got {len(dicts)}")
        several = len(dicts) > 1

        def naming(index: int) -> Naming:
            return (lambda name: f"args[{index}].{name}") if several else str

        shared: Dict[str, Any] = {}
        characters = []
        for index, data in enumerate(dicts):
            name = naming(index)
            unknown = sorted(str(key) for key in set(data) - set(DICT_KEYS))
            if unknown:
                raise ParamError(name(unknown[0]), f"unknown key; accepted keys: {', '.join(DICT_KEYS)}")
            for key, value in data.items():
                _check_api_type(key, value, name)
            values = dict(data)
            values.setdefault("enabled", True)
            for key in SHARED_NAMES:
                if key not in values:
                    continue
                value = values.pop(key)
                if index == 0:
                    shared[key] = value
                elif key in data and _shared_value(key, value, name) != _shared_value(
                        key, shared.get(key, getattr(cls, key)), naming(0)):
                    raise ParamError(name(key), f"{value!r} differs from args[0]'s "
                                                f"{shared.get(key, getattr(cls, key))!r}: all characters share it; "
                                                f"set it in the first dict only")
            if "regions" in values:
                values["regions"] = _regions_from_json(name("regions"), values["regions"], strict=True)
            characters.append(Character(unit=index + 1, **values))
        params = cls(characters=tuple(characters), **shared).validated(lambda i, c: naming(i))
        if params.enabled:
            for index, character in enumerate(params.characters):
                if character.image is None:
                    raise ParamError(naming(index)("image"), "required when enabled (base64 PNG/JPEG/WebP)")
                if not character.model:
                    raise ParamError(naming(index)("model"), "required when enabled: an adapter name from "
                                                             "GET /character-adapter/models")
        return params

    # ---- X/Y/Z plot cells ------------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Params":
        """These settings with an X/Y/Z cell's values on top, validated like any other input.

        Keys are the names in OVERRIDABLE (character 1's settings and the shared ones),
        "region_weights" (one weight per region of character 1, in order) and "character<k>_weight".
        """
        if not overrides:
            return self
        values = dict(overrides)
        region_weights = values.pop("region_weights", None)
        unit_weights = {}
        for key in [k for k in values if k.startswith("character") and k.endswith("_weight")]:
            unit = key[len("character"):-len("_weight")]
            if not unit.isdigit() or not 2 <= int(unit) <= MAX_CHARACTERS:
                raise ParamError(key, f"no such character setting; characters 2-{MAX_CHARACTERS} have one")
            unit_weights[int(unit)] = values.pop(key)
        unknown = sorted(set(values) - set(OVERRIDABLE))
        if unknown:
            raise ParamError(unknown[0], f"cannot be set per X/Y/Z cell; these can: {', '.join(OVERRIDABLE)}")
        first_values = {k: values.pop(k) for k in list(values) if k in CHARACTER_NAMES}
        by_unit = {c.unit: c for c in self.characters}
        if (first_values or region_weights is not None) and 1 not in by_unit:
            raise ParamError("Character 1", "has no reference image; its settings cannot be swept")
        if region_weights is not None:
            first = by_unit[1]
            weights = tuple(region_weights)
            if len(weights) != len(first.regions):
                raise ParamError(
                    "region weights",
                    f"{len(weights)} weight(s) for {len(first.regions)} region(s) "
                    f"({', '.join(r.reference_phrase for r in first.regions) or 'none: the whole image'})",
                )
            first_values["regions"] = tuple(replace(region, weight=weight)
                                            for region, weight in zip(first.regions, weights))
        if first_values:
            by_unit[1] = replace(by_unit[1], **first_values)
        for unit, weight in unit_weights.items():
            if unit not in by_unit:
                raise ParamError(f"Character {unit}: weight", "that unit has no reference image")
            by_unit[unit] = replace(by_unit[unit], weight=weight)
        params = replace(self, characters=tuple(by_unit[c.unit] for c in self.characters), **values)
        return params.validated()

    # ---- infotext ------------------------------------------------------------------------

    def to_infotext(self, image_hashes: Sequence[str]) -> Dict[str, Any]:
        """Key/value pairs for p.extra_generation_params: the shared settings, then per character
        (keys "Character-Adapter <field>" for unit 1, "Character-Adapter <unit> <field>" for the
        others) its reference as a short hash, model, encoder, weight, window, subject and regions."""
        if isinstance(image_hashes, str):
            image_hashes = [image_hashes]
        p = INFOTEXT_PREFIX
        info: Dict[str, Any] = {p: "on"}
        for character, image_hash in zip(self.characters, image_hashes):
            c = _infotext_prefix(character.unit)
            info[f"{c} reference"] = image_hash
            info[f"{c} model"] = character.model
            info[f"{c} encoder"] = character.encoder or "auto"
            info[f"{c} weight"] = character.weight
            info[f"{c} window"] = f"{character.start}-{character.end}"
            if character.unit == 1:  # the shared settings sit where a single character's always did
                info.update({f"{p} fusion": self.fusion, f"{p} temperature": self.temperature,
                             f"{p} background": self.background, f"{p} timestep": self.timestep,
                             f"{p} crop": self.crop})
            if character.subject:
                info[f"{c} subject"] = character.subject
            info[f"{c} regions"] = json.dumps(
                [[r.reference_phrase, r.phrase, r.weight] for r in character.regions], ensure_ascii=False)
        for key in ("fusion", "temperature", "background", "timestep", "crop"):
            info.setdefault(f"{p} {key}", getattr(self, key))
        return info

    @classmethod
    def from_infotext(cls, info: Mapping[str, Any]) -> Optional["Params"]:
        """Parse pasted generation parameters; None when the image did not use the adapter."""
        p = INFOTEXT_PREFIX
        if p not in info:
            return None
        characters = []
        for unit in range(1, MAX_CHARACTERS + 1):
            c = _infotext_prefix(unit)
            if not any(f"{c} {key}" in info for key in ("reference", "model", "regions")):
                continue
            start, _, end = str(info.get(f"{c} window", "0.0-1.0")).partition("-")
            encoder = str(info.get(f"{c} encoder", ""))
            values = dict(
                model=str(info.get(f"{c} model", "")),
                encoder="" if encoder == "auto" else encoder,
                weight=info.get(f"{c} weight", Character.weight),
                start=start,
                end=end,
                subject=str(info.get(f"{c} subject", "")),
                unit=unit,
            )
            if f"{c} regions" in info:
                values["regions"] = _regions_from_json("regions", info[f"{c} regions"])
            characters.append(Character(**values))
        return cls(
            enabled=True,
            characters=tuple(characters) or (Character(),),
            fusion=info.get(f"{p} fusion", cls.fusion),
            temperature=info.get(f"{p} temperature", cls.temperature),
            background=info.get(f"{p} background", cls.background),
            timestep=info.get(f"{p} timestep", cls.timestep),
            crop=info.get(f"{p} crop", cls.crop),
        ).validated()


def _infotext_prefix(unit: int) -> str:
    """"Character-Adapter" for unit 1 (today's keys), "Character-Adapter 2" for unit 2, ..."""
    return INFOTEXT_PREFIX if unit == 1 else f"{INFOTEXT_PREFIX} {unit}"


def _check_subjects(characters: Sequence[Character], names: Sequence[Naming]) -> None:
    """With two or more characters each needs its own subject phrase: its map finds its figure."""
    seen: Dict[str, int] = {}
    for character, name in zip(characters, names):
        subject = character.subject
        if not subject:
            raise ParamError(name("subject"), "required with two or more characters: the words of the prompt "
                                              "that name this one (e.g. 'girl', 'old knight')")
        if subject.lower() in seen:
            raise ParamError(name("subject"), f"{subject!r} is also Character {seen[subject.lower()]}'s subject: "
                                              f"each character needs its own")
        seen[subject.lower()] = character.unit


# ---- positional layout -------------------------------------------------------------------------

UNIT_PARTS = ("image", "model", "encoder", "weight", "start", "end", "subject")
REGION_PARTS = tuple(f"region{slot}_{part}" for slot in range(1, MAX_REGIONS + 1)
                     for part in ("reference_phrase", "phrase", "weight"))
SCALAR_NAMES = (
    "enabled", "image", "model", "encoder", "weight", "start", "end", "fusion",
    "temperature", "background", "timestep", "crop", "show_masks",
)
# the first 25 values are the single-character panel's (what every earlier version sent); unit 1's
# subject follows, then each further unit's own values
ARG_NAMES_ONE = SCALAR_NAMES + REGION_PARTS
UNIT_ARGS = len(UNIT_PARTS) + len(REGION_PARTS)


def _unit_prefix(unit: int) -> str:
    return "" if unit == 1 else f"character{unit}_"


def arg_names(units: int) -> Tuple[str, ...]:
    """Positional arg names of a panel with `units` character tabs."""
    names = ARG_NAMES_ONE + ("subject",)
    for unit in range(2, units + 1):
        names += tuple(_unit_prefix(unit) + part for part in UNIT_PARTS + REGION_PARTS)
    return names


def _units_for(length: int) -> int:
    """Tabs a positional list of `length` values covers (a partly given tab counts)."""
    extra = length - len(ARG_NAMES_ONE) - 1
    return 1 if extra <= 0 else 1 + -(-extra // UNIT_ARGS)


def default_args(units: int) -> List[Any]:
    """The panel's defaults for `units` tabs (ui() shows an empty generation phrase for "same as the
    reference phrase"; both parse alike)."""
    return Params().to_args(units)


ARG_NAMES = arg_names(DEFAULT_UNITS)
DICT_KEYS = SHARED_NAMES + CHARACTER_NAMES
# what an X/Y/Z axis may change per cell (besides "region_weights" and "character<k>_weight")
OVERRIDABLE = ("model", "weight", "start", "end", "fusion", "temperature", "timestep")
UI_DEFAULT_ARGS = tuple(default_args(DEFAULT_UNITS))


# ---- field checks ---------------------------------------------------------------------------

_API_TYPES = {
    "enabled": (bool,), "show_masks": (bool,),
    "weight": (int, float), "start": (int, float), "end": (int, float),
    "temperature": (int, float), "background": (int, float), "timestep": (int, float),
    "model": (str,), "encoder": (str,), "fusion": (str,), "crop": (str,),
    "image": (str,), "regions": (list, tuple), "subject": (str,),
}


def _check_api_type(key: str, value: Any, name: Naming = str) -> None:
    """JSON types are strict in the API: "0.5" is not a number there."""
    allowed = _API_TYPES[key]
    if isinstance(value, bool) and bool not in allowed:
        raise ParamError(name(key), f"expected {_type_names(allowed)}, got {value!r}")
    if value is None and key in ("image",):
        return
    if not isinstance(value, allowed):
        raise ParamError(name(key), f"expected {_type_names(allowed)}, got {type(value).__name__}")


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


def _validate_regions(regions: Sequence[Region], name: Naming = str) -> Tuple[Region, ...]:
    if len(regions) > MAX_REGIONS:
        raise ParamError(name("regions"), f"at most {MAX_REGIONS} regions, got {len(regions)}")
    checked = []
    seen = {}
    for index, region in enumerate(regions):
        label = name(f"regions[{index}]")
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


def _shared_value(key: str, value: Any, name: Naming) -> Any:
    """A shared setting's value normalised as validated() would (to compare two dicts' values)."""
    checks: Dict[str, Callable[[str, Any], Any]] = {
        "enabled": _as_bool, "show_masks": _as_bool,
        "fusion": lambda n, v: _as_choice(n, v, FUSION_MODES), "crop": lambda n, v: _as_choice(n, v, CROP_STYLES),
        "temperature": lambda n, v: _as_float(n, v, *RANGES["temperature"]),
        "background": lambda n, v: _as_float(n, v, *RANGES["background"]),
        "timestep": lambda n, v: _as_int(n, v, *RANGES["timestep"]),
    }
    return checks[key](name(key), value)
