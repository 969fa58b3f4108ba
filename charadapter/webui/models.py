"""Find IP-Adapter checkpoints and CLIP image encoders in the folders users already have.

Scanning is cheap: a .safetensors file is judged from its JSON header only (no tensor is
read); a pickle (.bin / .pth / .pt) is judged by its file name, because looking inside one
means unpickling it. Skipped on purpose:

- FaceID adapters (header keys with `to_k_lora` / `to_q_lora`, or "faceid" in a pickle's
  name): they need InsightFace face embeddings, which this extension does not compute;
- ControlNet models and any other checkpoint (no `image_proj.` + `ip_adapter.` keys).

Users pick models by the names listed here. Looking a name up in a listing is the only way
user input becomes a path: text from the UI, the API or an infotext is never joined into a
path. Listed names never contain a path separator and never start with a dot.

Everything but `webui_folders`, `listing`, `refresh` and the `resolve_*` helpers takes plain
paths, so it runs without the WebUI.
"""

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from ..weightfile import read_safetensors_header
from .settings import SETTING_EXTRA_FOLDERS

logger = logging.getLogger(__name__)

ADAPTER = "adapter"
ENCODER = "encoder"
VIT_H = "ViT-H-14"
VIT_BIGG = "ViT-bigG-14"
ENCODER_WIDTHS = {1280: VIT_H, 1664: VIT_BIGG}  # width of vision_model.embeddings.class_embedding

PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
# kept equal to charadapter.clip_vision.FOLDER_WEIGHTS (a test pins it; importing that module
# here would pull torch into folder scanning)
FOLDER_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "model.fp16.safetensors", "pytorch_model.fp16.bin",
)
ADAPTER_FOLDER_FILES = ("ip_adapter.safetensors", "ip_adapter.bin")  # InvokeAI layout (checkpoint.read_checkpoint)
ENCODER_MODEL_TYPES = ("clip_vision_model", "clip")
VISION_KEY_PREFIXES = ("vision_model.", "visual_projection.", "visual.")
CLASS_EMBEDDING_SUFFIXES = ("vision_model.embeddings.class_embedding", "visual.class_embedding")

MAX_DEPTH = 3  # h94's clone: ipadapter/IP-Adapter/models/image_encoder
MAX_ENTRIES = 20000  # per scan: an extra folder set to "/" must not hang the UI
MAX_CONFIG_BYTES = 1_000_000
RESERVED_ENCODER_NAMES = ("auto",)  # the encoder dropdown's "Auto" entry

EXTENSION_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_ENCODER_FILE = re.compile(r"clip.*vision|image_encoder|^clip-vit-(h|bigg)-14")
_ENCODER_STEMS = ("clip_h", "clip_g")  # sd-webui-controlnet's annotator/downloads/clip_vision
_HEADER_NEEDLES = (b"image_proj.", b"vision_model.", b"visual.")  # some key of every file we list
_ADAPTER_FILE = re.compile(r"ip[-_]?adapter")
_H_NAME = re.compile(r"(?<![a-z0-9])(clip[_-]?(vision[_-]?)?h|vit[_-]?h)(?![a-z0-9])")
_G_NAME = re.compile(r"bigg|(?<![a-z0-9])clip[_-]?(vision[_-]?)?g(?![a-z0-9])")


@dataclass(frozen=True)
class ModelListing:
    """Display name -> path of every adapter and encoder found, in folder priority order."""

    adapters: Dict[str, str] = field(default_factory=dict)
    encoders: Dict[str, str] = field(default_factory=dict)
    folders: Tuple[str, ...] = ()

    def adapter_path(self, name: Any) -> Optional[str]:
        """Path of a listed adapter name; None for anything else (paths included)."""
        return _lookup(self.adapters, name)

    def encoder_path(self, name: Any) -> Optional[str]:
        """Path of a listed encoder name; None for anything else (paths included)."""
        return _lookup(self.encoders, name)


def _lookup(table: Mapping[str, str], name: Any) -> Optional[str]:
    """Exact dictionary lookup: the one place where user text meets a path."""
    return table.get(name) if isinstance(name, str) else None


# ---------------------------------------------------------------- folders


def _same_place(path: str) -> str:
    """Key under which two spellings of one folder compare equal."""
    return os.path.normcase(os.path.realpath(path))


def candidate_folders(webui_models_path: Optional[str], extension_dir: Optional[str],
                      controlnet_dirs: Iterable[str], extra_folders: Iterable[str]) -> List[str]:
    """Existing folders to scan, highest priority first, each once."""
    wanted: List[str] = []
    if extension_dir:
        wanted += [os.path.join(extension_dir, "models"), os.path.join(extension_dir, "models", "ipadapter")]
    if webui_models_path:
        wanted += [os.path.join(webui_models_path, sub) for sub in ("ControlNet", "ipadapter", "clip_vision")]
    for cn in controlnet_dirs:
        wanted += [os.path.join(cn, "models"), os.path.join(cn, "annotator", "downloads", "clip_vision")]
    wanted += [f for f in extra_folders if f]
    out, seen = [], set()
    for folder in wanted:
        folder = os.path.abspath(os.path.expanduser(folder))
        key = _same_place(folder)
        if key in seen or not os.path.isdir(folder):
            continue
        seen.add(key)
        out.append(folder)
    return out


def find_controlnet_dirs(extension_roots: Iterable[str]) -> List[str]:
    """sd-webui-controlnet installs in extensions/ or extensions-builtin/ under any folder name."""
    found = []
    for root in extension_roots:
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        for name in names:
            path = os.path.join(root, name)
            if (os.path.isfile(os.path.join(path, "scripts", "controlnet.py"))
                    and os.path.isdir(os.path.join(path, "annotator"))):
                found.append(path)
    return found


def controlnet_setting_folders(settings: Mapping[str, Any], cmd_opts: Any, data_path: str) -> List[str]:
    """Folders that sd-webui-controlnet's own settings and flags point at."""
    out = []
    for models in (settings.get("control_net_models_path"), getattr(cmd_opts, "controlnet_dir", None)):
        if models:  # global_state.update_cn_models uses these as given
            out.append(str(models))
    annotators = (settings.get("control_net_modules_path")
                  or getattr(cmd_opts, "controlnet_annotator_models_path", None))
    if annotators:  # annotator/annotator_path.py: relative to the data folder
        annotators = str(annotators)
        if not os.path.isabs(annotators):
            annotators = os.path.join(data_path, annotators)
        out.append(os.path.join(annotators, "clip_vision"))
    return out


def parse_folder_list(text: Any) -> List[str]:
    """The Settings text: folders separated by new lines or ';', quotes and '~' allowed."""
    if not isinstance(text, str):
        return []
    out = []
    for part in re.split(r"[;\r\n]", text):
        part = part.strip().strip("\"'").strip()
        if part:
            out.append(os.path.expanduser(part))
    return out


# ---------------------------------------------------------------- reading headers


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    """A small JSON object file, or None."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _is_faceid(keys: Iterable[str]) -> bool:
    """FaceID files carry LoRA weights beside the IP projections."""
    return any(".to_k_lora." in k or ".to_q_lora." in k for k in keys)


def _is_adapter_header(header: Mapping[str, Any]) -> bool:
    """IP-Adapter flat layout: image_proj.* and ip_adapter.* keys, FaceID excluded."""
    keys = list(header)
    return (any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)
            and not _is_faceid(keys))


def _header_width(header: Mapping[str, Any]) -> Optional[int]:
    """Encoder width from the class embedding's shape (Hugging Face or OpenCLIP names)."""
    for key, info in header.items():
        if key.endswith(CLASS_EMBEDDING_SUFFIXES):
            shape = info.get("shape")
            if isinstance(shape, list) and shape and isinstance(shape[-1], int):
                return shape[-1]
    return None


def _only_vision_keys(header: Mapping[str, Any]) -> bool:
    """Every tensor belongs to a CLIP vision tower (so any file name will do)."""
    return bool(header) and all(k.startswith(VISION_KEY_PREFIXES) for k in header)


def _encoder_named(name: str) -> bool:
    """clip_h.pth, clip_g.pth, *clip*vision*, *image_encoder*, CLIP-ViT-H-14*, CLIP-ViT-bigG-14*."""
    low = name.lower()
    return os.path.splitext(low)[0] in _ENCODER_STEMS or bool(_ENCODER_FILE.search(low))


def _adapter_named(name: str) -> bool:
    """ip-adapter* pickles; FaceID ones are left out."""
    low = name.lower()
    return bool(_ADAPTER_FILE.search(low)) and "faceid" not in low


# ---------------------------------------------------------------- classifying


def classify_file(path: str) -> Optional[str]:
    """ADAPTER, ENCODER or None for one file, reading at most its safetensors header."""
    name = os.path.basename(path)
    low = name.lower()
    if low.endswith(".safetensors"):
        header = read_safetensors_header(path, _HEADER_NEEDLES)
        if not header:
            return None
        if _is_adapter_header(header):
            return ADAPTER
        if _header_width(header) is not None and (_encoder_named(name) or _only_vision_keys(header)):
            return ENCODER
        return None
    if low.endswith(PICKLE_SUFFIXES):
        if _encoder_named(name):
            return ENCODER
        if _adapter_named(name):
            return ADAPTER
    return None


def _encoder_config(folder: str) -> Optional[Dict[str, Any]]:
    """config.json of a Hugging Face CLIP (vision) folder that also holds weights, else None."""
    config = _read_json(os.path.join(folder, "config.json"))
    if config is None or config.get("model_type") not in ENCODER_MODEL_TYPES:
        return None
    if not any(os.path.isfile(os.path.join(folder, w)) for w in FOLDER_WEIGHTS):
        return None
    return config


def classify_folder(path: str) -> Optional[str]:
    """ADAPTER (InvokeAI ip_adapter.* folder), ENCODER (Hugging Face CLIP folder) or None."""
    if any(os.path.isfile(os.path.join(path, n)) for n in ADAPTER_FOLDER_FILES):
        return ADAPTER
    if _encoder_config(path) is not None:
        return ENCODER
    return None


def _clean_name(text: str) -> str:
    """A display name that survives Params' checks: one-spaced, no separators, no leading dot."""
    text = " ".join(text.replace("/", "_").replace("\\", "_").replace("\x00", "").split())
    return text.lstrip(".") or "unnamed"


def _unique_names(found: Sequence[Tuple[str, str]], reserved: Sequence[str] = ()) -> Dict[str, str]:
    """Name -> path; a later file with a taken name gets its parent folder as prefix."""
    names: Dict[str, str] = {}
    for path, base in found:
        base = _clean_name(base)
        name = base
        if name in names or name.lower() in reserved:
            parent = _clean_name(os.path.basename(os.path.dirname(path)))
            name = candidate = f"{parent} - {base}"
            count = 2
            while name in names:
                name = f"{candidate} ({count})"
                count += 1
        names[name] = path
    return names


class _Walk:
    """One scan's state: what was found, what was visited, how much budget is left."""

    def __init__(self) -> None:
        self.found: Dict[str, List[Tuple[str, str]]] = {ADAPTER: [], ENCODER: []}
        self.seen: Set[str] = set()
        self.budget = MAX_ENTRIES

    def folder(self, folder: str, depth: int) -> None:
        """Files first (shallow files win plain names), then subfolders, in name order."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: (e.name.lower(), e.name))
        except OSError:
            return
        subfolders = []
        for entry in entries:
            self.budget -= 1
            if self.budget < 0:
                return
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                continue
            key = _same_place(entry.path)
            if key in self.seen:
                continue
            kind = classify_folder(entry.path) if is_dir else classify_file(entry.path) if is_file else None
            if kind is not None:
                self.seen.add(key)
                self.found[kind].append((entry.path, entry.name))
            elif is_dir and depth < MAX_DEPTH:
                subfolders.append((entry.path, key))
        for path, key in subfolders:
            if key not in self.seen:
                self.seen.add(key)  # symlink loops end here
                self.folder(path, depth + 1)


def scan(folders: Sequence[str]) -> ModelListing:
    """Adapters and encoders in `folders` (priority order), up to MAX_DEPTH levels down."""
    walk = _Walk()
    for folder in folders:
        key = _same_place(folder)
        if key in walk.seen or not os.path.isdir(folder):
            continue
        walk.seen.add(key)
        walk.folder(folder, 0)
    return ModelListing(
        adapters=_unique_names(walk.found[ADAPTER]),
        encoders=_unique_names(walk.found[ENCODER], RESERVED_ENCODER_NAMES),
        folders=tuple(folders),
    )


# ---------------------------------------------------------------- matching encoders


def _canonical_encoder(text: Any) -> Optional[str]:
    """"ViT-H-14" / "ViT-bigG-14" in any letter case, else None."""
    if not isinstance(text, str):
        return None
    return {VIT_H.lower(): VIT_H, VIT_BIGG.lower(): VIT_BIGG}.get(text.strip().lower())


def encoder_kind_from_name(path: str) -> Optional[str]:
    """VIT_H / VIT_BIGG from the file or folder name (and h94's folder layout), else None."""
    base = os.path.basename(os.path.normpath(path)).lower()
    parent = os.path.basename(os.path.dirname(os.path.normpath(path))).lower()
    if base.startswith("image_encoder"):  # h94/IP-Adapter: models/ is ViT-H, sdxl_models/ is ViT-bigG
        if parent == "sdxl_models":
            return VIT_BIGG
        if parent == "models":
            return VIT_H
    is_h, is_g = bool(_H_NAME.search(base)), bool(_G_NAME.search(base))
    if is_h != is_g:
        return VIT_H if is_h else VIT_BIGG
    return None


def encoder_width(path: str) -> Optional[int]:
    """Encoder width from a config.json or a safetensors header, never from tensor data."""
    if os.path.isdir(path):
        config = _read_json(os.path.join(path, "config.json")) or {}
        vision = config.get("vision_config") if config.get("model_type") == "clip" else config
        width = vision.get("hidden_size") if isinstance(vision, dict) else None
        if isinstance(width, int):
            return width
        path = os.path.join(path, "model.safetensors")
    if path.lower().endswith(".safetensors") and os.path.isfile(path):
        header = read_safetensors_header(path)
        return _header_width(header) if header else None
    return None


def encoder_kind_from_shapes(path: str) -> Optional[str]:
    """VIT_H / VIT_BIGG from the stored width (1280 / 1664), else None."""
    width = encoder_width(path)
    return ENCODER_WIDTHS.get(width) if width is not None else None


_kind_cache: Dict[Tuple[str, int, int], Optional[str]] = {}


def _stamp(path: str) -> Tuple[str, int, int]:
    """Cache key that changes when the file (or the folder's config.json) changes."""
    target = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        st = os.stat(target)
        return path, st.st_mtime_ns, st.st_size
    except OSError:
        return path, -1, -1


def encoder_kind(path: str) -> Optional[str]:
    """VIT_H / VIT_BIGG: stored shapes when the file has readable metadata, else the name.

    Shapes win because a name can lie: h94's ViT-bigG folder copied next to our models is
    just "models/image_encoder", the name of h94's ViT-H folder. Pickles have no cheap
    metadata, so their names decide.
    """
    key = _stamp(path)
    if key not in _kind_cache:
        if len(_kind_cache) > 256:
            _kind_cache.clear()
        _kind_cache[key] = encoder_kind_from_shapes(path) or encoder_kind_from_name(path)
    return _kind_cache[key]


def pick_encoder(adapter_spec_encoder: str, encoders: Mapping[str, str]) -> Optional[str]:
    """Name of the first listed encoder of the kind the adapter needs ("ViT-H-14" / "ViT-bigG-14")."""
    want = _canonical_encoder(adapter_spec_encoder)
    if want is None:
        return None
    for name, path in encoders.items():
        if encoder_kind(path) == want:
            return name
    return None


# ---------------------------------------------------------------- the WebUI's folders and the listing


def webui_folders() -> List[str]:
    """candidate_folders() filled in from the running WebUI's paths and settings."""
    from modules import paths, shared  # the host; only importable inside the WebUI

    builtin = getattr(paths, "extensions_builtin_dir", None)
    cn_dirs = find_controlnet_dirs([d for d in (paths.extensions_dir, builtin) if d])
    settings = shared.opts.data
    extra = controlnet_setting_folders(settings, shared.cmd_opts, paths.data_path)
    extra += parse_folder_list(settings.get(SETTING_EXTRA_FOLDERS, ""))
    return candidate_folders(paths.models_path, EXTENSION_DIR, cn_dirs, extra)


_lock = threading.RLock()
_cached: Optional[ModelListing] = None


def listing() -> ModelListing:
    """The cached listing; only the first call scans."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = scan(webui_folders())
        return _cached


def refresh(folders: Optional[Sequence[str]] = None) -> ModelListing:
    """Rescan (the WebUI's folders unless given) and replace the cached listing."""
    global _cached
    with _lock:
        _cached = scan(webui_folders() if folders is None else folders)
        logger.info("Character-Adapter: %d adapter(s), %d image encoder(s) in %d folder(s)",
                    len(_cached.adapters), len(_cached.encoders), len(_cached.folders))
        return _cached


def _plausible_name(name: Any) -> bool:
    """Worth a rescan: text that scan() could have produced (a path never is)."""
    return isinstance(name, str) and bool(name) and name == _clean_name(name) and name.lower() != "auto"


def resolve_adapter(name: Any, rescan_on_miss: bool = True) -> Optional[str]:
    """Path of a listed adapter; an unknown name triggers one rescan (files added since)."""
    path = listing().adapter_path(name)
    if path is None and rescan_on_miss and _plausible_name(name):
        path = refresh().adapter_path(name)
    return path


def resolve_encoder(name: Any, rescan_on_miss: bool = True) -> Optional[str]:
    """Path of a listed encoder; an unknown name triggers one rescan (files added since)."""
    path = listing().encoder_path(name)
    if path is None and rescan_on_miss and _plausible_name(name):
        path = refresh().encoder_path(name)
    return path
