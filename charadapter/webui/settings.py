"""Settings → Character-Adapter: extra model folders, the cache sizes, the number of character tabs."""

from ..params import DEFAULT_UNITS, MAX_CHARACTERS
from . import caches

SETTINGS_SECTION = ("character_adapter", "Character-Adapter")
SETTING_EXTRA_FOLDERS = "character_adapter_model_folders"
SETTING_SEGMENTATION_CACHE = "character_adapter_segmentation_cache"
SETTING_ADAPTERS_LOADED = "character_adapter_adapters_loaded"
SETTING_UNITS = "character_adapter_units"


def character_units() -> int:
    """How many character tabs the panel shows (Settings; read when the UI is built)."""
    from modules import shared

    try:
        units = int(float(shared.opts.data.get(SETTING_UNITS, DEFAULT_UNITS)))
    except (TypeError, ValueError):
        return DEFAULT_UNITS
    return min(max(units, 1), MAX_CHARACTERS)


def apply_cache_settings() -> None:
    """Resize the caches to the Settings values (read at each run start and on change)."""
    from modules import shared

    data = shared.opts.data
    caches.resize(data.get(SETTING_SEGMENTATION_CACHE, caches.DEFAULT_SEGMENTATION_CACHE),
                  data.get(SETTING_ADAPTERS_LOADED, caches.DEFAULT_ADAPTERS_LOADED))


def add_settings() -> None:
    """Register the Settings section; call from script_callbacks.on_ui_settings."""
    import gradio as gr
    from modules import shared

    shared.opts.add_option(SETTING_EXTRA_FOLDERS, shared.OptionInfo(
        "", "Extra folders with IP-Adapter and CLIP image encoder files (one per line or ';'-separated; "
        "press 🔄 next to the model list after changing)", section=SETTINGS_SECTION))
    shared.opts.add_option(SETTING_SEGMENTATION_CACHE, shared.OptionInfo(
        caches.DEFAULT_SEGMENTATION_CACHE, "Reference segmentations kept in memory (0 = segment every generation)",
        gr.Slider, {"minimum": 0, "maximum": 64, "step": 1}, onchange=apply_cache_settings,
        section=SETTINGS_SECTION))
    shared.opts.add_option(SETTING_ADAPTERS_LOADED, shared.OptionInfo(
        caches.DEFAULT_ADAPTERS_LOADED, "IP-Adapter models kept loaded (0 = load from disk every generation)",
        gr.Slider, {"minimum": 0, "maximum": 8, "step": 1}, onchange=apply_cache_settings,
        section=SETTINGS_SECTION))
    shared.opts.add_option(SETTING_UNITS, shared.OptionInfo(
        DEFAULT_UNITS, "Character tabs in the panel (one reference each; one tab = the single-character panel)",
        gr.Slider, {"minimum": 1, "maximum": MAX_CHARACTERS, "step": 1}, section=SETTINGS_SECTION).needs_reload_ui())
