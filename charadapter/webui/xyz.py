"""X/Y/Z plot axes: "[Character-Adapter] Weight" and friends, and the per-cell overrides they set.

The first character's settings and the shared ones have an axis each (as a single-character
panel always had); every further character tab has a weight axis ("Character 2 weight", ...).

The WebUI loads scripts/xyz_grid.py as a module named "xyz_grid.py" that is not in sys.modules;
extensions find it in `modules.scripts.scripts_data` and extend its `axis_options` list
(sd-webui-controlnet scripts/xyz_grid_support.py does the same). Its `ui()` copies that list,
so the axes must be there before the UI is built: `add_axes()` runs when our script file is
imported (the WebUI's own scripts, xyz_grid among them, are loaded before extensions) and again
from `on_before_ui`; it adds each axis once.

A cell runs on a shallow copy of `p`, so `apply` sets one attribute per setting on that copy;
Controller.process reads them back with `cell_overrides(p)`. Nothing is written to shared objects.
"""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..params import MAX_CHARACTERS, FUSION_MODES, RANGES, ParamError, Params, _as_choice, _as_float, _as_int, _as_name
from . import refusal

log = logging.getLogger("character_adapter")

LABEL_PREFIX = "[Character-Adapter] "
ATTR_PREFIX = "character_adapter_"
XYZ_MODULE_NAMES = ("xyz_grid.py",)
TITLE = "Character-Adapter"


def parse_region_weights(text: Any) -> Tuple[float, ...]:
    """One X/Y/Z cell of the "Region weights" axis: weights separated by commas or spaces.

    A cell holding commas must be quoted in the X/Y/Z text ("1, 0.5, 0", "0, 1, 1"), as the
    grid splits its text like CSV; spaces need no quotes (1 0.5 0, 0 1 1).
    """
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).replace(",", " ").replace(";", " ").split()
    try:
        if not parts:
            raise ParamError("region weights", "empty cell; expected one weight per region, e.g. 1 0.5 0")
        return tuple(_as_float("region weights", part, *RANGES["region_weight"]) for part in parts)
    except InputError as err:  # the grid's type conversion: the caller's value
        raise refusal.refuse(str(err)) from None


def format_region_weights(p, opt, x) -> str:
    return f"{opt.label}: {', '.join(f'{w:g}' for w in x)}"


def _adapter_names() -> List[str]:
    from . import models

    return list(models.listing().adapters)


def _fusion_choices() -> List[str]:
    return list(FUSION_MODES)


def _confirm(setting: str, check: Callable[[Any], Any]) -> Callable[[Any, Sequence[Any]], None]:
    """An AxisOption.confirm: reject bad values before the grid starts, with the panel's settings at hand."""

    def confirm(p, xs):
        panel = _panel_params(p)
        if panel is not None and not panel.enabled:
            raise refusal.refuse(f"{TITLE}: the Character-Adapter panel is off; tick it to sweep its settings")
        try:
            for x in xs:
                check(x)
                if panel is not None:
                    panel.with_overrides({setting: x})  # in the panel's context: one weight per region, a used tab
        except InputError as err:  # the grid stops before its first cell: the caller's value
            raise refusal.refuse(str(err)) from None

    return confirm


def _check_model(name: Any) -> None:
    from . import models

    _as_name("model", name)
    if models.resolve_adapter(name) is None:
        raise ParamError("model", f"{name!r} is not an IP-Adapter in the list")


# (label, setting, type, check, extra AxisOption keyword arguments)
AXES: Tuple[Tuple[str, str, Callable, Callable, Dict[str, Any]], ...] = (
    ("Weight", "weight", float, lambda x: _as_float("weight", x, *RANGES["weight"]), {}),
    ("Start", "start", float, lambda x: _as_float("start", x, *RANGES["start"]), {}),
    ("End", "end", float, lambda x: _as_float("end", x, *RANGES["end"]), {}),
    ("Fusion mode", "fusion", str, lambda x: _as_choice("fusion", x, FUSION_MODES), {"choices": _fusion_choices}),
    ("Temperature", "temperature", float, lambda x: _as_float("temperature", x, *RANGES["temperature"]), {}),
    ("Segmentation timestep", "timestep", int, lambda x: _as_int("timestep", x, *RANGES["timestep"]), {"cost": 0.2}),
    ("Region weights", "region_weights", parse_region_weights, lambda x: x,
     {"format_value": format_region_weights}),
    ("IP-Adapter model", "model", str, _check_model, {"choices": _adapter_names, "cost": 0.5}),
)



def character_axes(units: int) -> Tuple[Tuple[str, str, Callable, Callable, Dict[str, Any]], ...]:
    """A weight axis for each character tab after the first."""
    return tuple((f"Character {unit} weight", f"character{unit}_weight", float,
                  lambda x, unit=unit: _as_float(f"Character {unit}: weight", x, *RANGES["weight"]), {})
                 for unit in range(2, units + 1))


SETTINGS = tuple(setting for _, setting, _, _, _ in AXES + character_axes(MAX_CHARACTERS))


def _apply(setting: str) -> Callable[[Any, Any, Sequence[Any]], None]:
    attribute = ATTR_PREFIX + setting

    def apply(p, x, xs):
        setattr(p, attribute, x)  # p is this cell's own copy

    return apply


def make_axes(xyz_module, units: int = 1) -> List[Any]:
    """The AxisOption objects for a panel of `units` character tabs, built with the xyz module's own class."""
    options = []
    for label, setting, kind, check, extra in AXES + character_axes(units):
        options.append(xyz_module.AxisOption(
            LABEL_PREFIX + label, kind, _apply(setting), confirm=_confirm(setting, check), **extra))
    return options


def find_xyz_module(scripts_data: Optional[Sequence[Any]] = None):
    """The loaded scripts/xyz_grid.py module, or None (like ControlNet's find_module)."""
    if scripts_data is None:
        from modules import scripts

        scripts_data = scripts.scripts_data
    for data in scripts_data:
        if data.script_class.__module__ in XYZ_MODULE_NAMES and hasattr(data, "module"):
            return data.module
    return None


def add_axes() -> int:
    """Add our axes to the X/Y/Z plot's list once; return how many were added."""
    try:
        xyz = find_xyz_module()
        if xyz is None:
            return 0
        from .settings import character_units

        present = {getattr(option, "label", None) for option in xyz.axis_options}
        new = [option for option in make_axes(xyz, character_units()) if option.label not in present]
        xyz.axis_options.extend(new)
        return len(new)
    except Exception:  # noqa: BLE001 - an X/Y/Z change must not break loading the extension
        log.exception("Character-Adapter: could not add the X/Y/Z plot axes")
        return 0


def cell_overrides(p) -> Dict[str, Any]:
    """The X/Y/Z values set on this cell's `p` (empty outside a grid)."""
    found = {}
    for setting in SETTINGS:
        value = getattr(p, ATTR_PREFIX + setting, None)
        if value is not None:
            found[setting] = value
    return found


def _panel_params(p) -> Optional[Params]:
    """Our panel's settings in this generation's args; None when they cannot be read."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None)
    if runner is None or args is None:
        return None
    for script in getattr(runner, "alwayson_scripts", []):
        try:
            if script.title() == TITLE:
                return Params.from_args(args[script.args_from:script.args_to])
        except Exception:  # noqa: BLE001 - bad panel settings fail each cell with their own message
            return None
    return None
