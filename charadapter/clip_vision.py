"""CLIP image encoder: load the user's weights, preprocess references, encode them.

The IP-Adapter encoders are OpenCLIP ViT-H/14 (SD1.5 and the SDXL `*_vit-h` adapters) and
ViT-bigG/14 (SDXL base), run as `transformers.CLIPVisionModelWithProjection`. Their configs are
shipped in `charadapter/configs/`; the weights come from the user's files in whichever layout
they already have:

- Hugging Face: `vision_model.*` + `visual_projection.weight` (h94/IP-Adapter
  `models/image_encoder/model.safetensors`, ComfyUI `models/clip_vision/*.safetensors`, and the
  `clip_h.pth` / `clip_g.pth` pickles of sd-webui-controlnet, which that extension loads straight
  into `CLIPVisionModelWithProjection`), optionally behind a prefix ("clip_vision.", "model.", ...)
  or inside a full `CLIPModel` (text tower ignored);
- OpenCLIP: `visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`, ...
  (text tower ignored), converted to the Hugging Face names.

Preprocessing pads to a square with a neutral colour and never centre-crops, so a full-body
reference keeps its head and feet.
"""

import json
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .errors import CheckpointError, ImageInputError
from .images import pad_to_square
from .weightfile import read_pickle, read_safetensors

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SHIPPED_CONFIGS = {"ViT-H-14": "clip_vision_vit_h_14.json", "ViT-bigG-14": "clip_vision_vit_bigg_14.json"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIPVisionConfig fields common to transformers 4.30 .. 5.x; anything else in a config.json is dropped
CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    "initializer_range", "initializer_factor",
)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
FOLDER_WEIGHTS = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json", "model.fp16.safetensors", "pytorch_model.fp16.bin",
)
CLASS_KEY = "vision_model.embeddings.class_embedding"
POSITION_IDS = "vision_model.embeddings.position_ids"  # persistent buffer in transformers 4.30, not after
FULL_CLIP_EXTRAS = ("text_model.", "text_projection.", "logit_scale")  # a CLIPModel's other half
_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------- configs


def config_from_dict(d: Mapping[str, Any]) -> "Any":
    """CLIPVisionConfig from a config dict (a CLIPModel config gives its vision half)."""
    from transformers import CLIPVisionConfig

    d = dict(d)
    if isinstance(d.get("vision_config"), Mapping):  # full CLIPModel config.json
        top_proj = d.get("projection_dim")
        d = dict(d["vision_config"])
        if top_proj is not None:
            d.setdefault("projection_dim", top_proj)
    return CLIPVisionConfig(**{k: d[k] for k in CONFIG_FIELDS if k in d})


def shipped_config(name: str) -> "Any":
    """The shipped CLIPVisionConfig of "ViT-H-14" or "ViT-bigG-14"."""
    if name not in SHIPPED_CONFIGS:
        raise CheckpointError(f"unknown CLIP image encoder {name!r}; expected one of {sorted(SHIPPED_CONFIGS)}")
    with open(os.path.join(CONFIG_DIR, SHIPPED_CONFIGS[name]), encoding="utf-8") as f:
        return config_from_dict(json.load(f))


def _as_config(config: Any) -> Any:
    """Accept a CLIPVisionConfig, a dict or a shipped encoder name."""
    from transformers import CLIPVisionConfig

    if isinstance(config, CLIPVisionConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    if isinstance(config, str):
        return shipped_config(config)
    raise CheckpointError(f"config must be a CLIPVisionConfig, a dict or an encoder name; got {type(config).__name__}")


def encoder_name(config_or_model: Any) -> Optional[str]:
    """"ViT-H-14" / "ViT-bigG-14" when the config has a shipped encoder's shape, else None."""
    cfg = getattr(config_or_model, "config", config_or_model)
    for name in SHIPPED_CONFIGS:
        ref = shipped_config(name)
        if all(getattr(cfg, k, None) == getattr(ref, k) for k in ("hidden_size", "num_hidden_layers", "projection_dim")):
            return name
    return None


def feature_dim(model: Any, plus: bool) -> int:
    """Width of what encode_images returns: hidden width W (plus) or projection width E (base)."""
    return int(model.config.hidden_size if plus else model.config.projection_dim)


# ---------------------------------------------------------------- reading files


def _read_pickle(path: str) -> Dict[str, Any]:
    """Dict from a torch pickle, read with weights_only=True only."""
    obj = read_pickle(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}; convert it to .safetensors")
    return dict(obj)


def _read_index(path: str) -> Dict[str, torch.Tensor]:
    """Merge the shards listed by a Hugging Face *.index.json."""
    try:
        with open(path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable shard index ({type(e).__name__}: {e})")
    sd: Dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(read_weights(os.path.join(os.path.dirname(path), shard)))
    return sd


def read_weights(path: PathLike) -> Dict[str, Any]:
    """Raw dict from a .safetensors, shard index or torch pickle file (no key changes)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: CLIP image encoder file not found")
    low = path.lower()
    if low.endswith(".safetensors"):
        return read_safetensors(path)
    if low.endswith(".index.json"):
        return _read_index(path)
    if low.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path)
    raise CheckpointError(f"{path}: unsupported file type; expected .safetensors, {', '.join(PICKLE_SUFFIXES)} or a folder")


def _unwrap(raw: Dict[str, Any], source: str) -> Dict[str, torch.Tensor]:
    """Tensors of a flat dict, looking inside a lone {"state_dict": ...} / {"model": ...} wrapper."""
    for wrapper in ("state_dict", "model", "module"):
        inner = raw.get(wrapper)
        if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
            raw = dict(inner)
            break
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {_few(raw.keys())})")
    return tensors


# ---------------------------------------------------------------- key layouts


def _few(keys: Iterable[Any], n: int = 5) -> str:
    """A short, sorted sample of keys for messages."""
    keys = sorted(str(k) for k in keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _single_prefix(prefixes: List[str], what: str, source: str) -> str:
    """The one prefix found, or CheckpointError when several encoders sit in one file."""
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: several {what} encoders in one file (prefixes {prefixes}); cannot choose")
    return prefixes[0]


def _hf_prefix(sd: Mapping[str, torch.Tensor]) -> Optional[List[str]]:
    """Prefixes before `vision_model.embeddings.class_embedding`, or None when absent."""
    found = sorted(k[: -len(CLASS_KEY)] for k in sd if k.endswith(CLASS_KEY))
    return found if found else None


def _openclip_prefix(sd: Mapping[str, torch.Tensor]) -> Optional[List[str]]:
    """Prefixes p with p+"conv1.weight", p+"class_embedding" and OpenCLIP resblocks, or None."""
    found = []
    for k in sd:
        if k.endswith("conv1.weight"):
            p = k[: -len("conv1.weight")]
            if p + "class_embedding" in sd and p + "transformer.resblocks.0.attn.in_proj_weight" in sd:
                found.append(p)
    return sorted(found) if found else None


def _hf_from_prefixed(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Keys under `prefix`, stripped; a full CLIPModel's text half is dropped."""
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue  # another component of a bundle (only possible with a non-empty prefix)
        name = k[len(prefix):]
        if name.startswith(FULL_CLIP_EXTRAS):
            continue
        out[name] = v
    return out


_OPENCLIP_TOP = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_RES = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPENCLIP_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def openclip_to_hf(sd: Mapping[str, torch.Tensor], prefix: str = "visual.") -> Dict[str, torch.Tensor]:
    """Rename an OpenCLIP visual tower to Hugging Face keys; unknown keys keep their name."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue  # text tower, logit_scale, ...
        name = k[len(prefix):]
        if name in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[name]] = v
        elif name == "proj":
            out["visual_projection.weight"] = v.t().contiguous()  # OpenCLIP x @ proj, (W, E) -> Linear (E, W)
        elif _OPENCLIP_IN_PROJ.match(name):
            i, kind = _OPENCLIP_IN_PROJ.match(name).groups()
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):  # (3W, ...) -> 3 x (W, ...)
                out[f"vision_model.encoder.layers.{i}.self_attn.{part}.{kind}"] = t.contiguous()
        elif _OPENCLIP_RES.match(name) and _OPENCLIP_RES.match(name).group(2) in _OPENCLIP_BLOCK:
            i, mod, kind = _OPENCLIP_RES.match(name).groups()
            out[f"vision_model.encoder.layers.{i}.{_OPENCLIP_BLOCK[mod]}.{kind}"] = v
        else:
            out[prefix + name] = v  # surfaces as an unexpected key, by its own name
    return out


def normalize_state_dict(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """Any supported layout -> Hugging Face CLIPVisionModelWithProjection keys (no position_ids)."""
    hf = _hf_prefix(sd)
    if hf is not None:
        out = _hf_from_prefixed(sd, _single_prefix(hf, "Hugging Face CLIP vision", source))
    else:
        oc = _openclip_prefix(sd)
        if oc is None:
            raise CheckpointError(
                f"{source}: not a CLIP image encoder: expected Hugging Face keys ({CLASS_KEY}, "
                "vision_model.encoder.layers.N..., visual_projection.weight) or OpenCLIP keys "
                f"(visual.conv1.weight, visual.transformer.resblocks.N.attn.in_proj_weight, ...); "
                f"found {len(sd)} keys such as {_few(sd.keys())}")
        out = openclip_to_hf(sd, _single_prefix(oc, "OpenCLIP", source))
    out.pop(POSITION_IDS, None)  # always rebuilt: old transformers saved it, newer ones do not
    return out


def _layer_count(sd: Mapping[str, torch.Tensor]) -> int:
    """Number of encoder layers named in a Hugging Face-layout dict."""
    idx = [int(m.group(1)) for m in (_HF_LAYER.match(k) for k in sd) if m]
    return max(idx) + 1 if idx else 0


def detect_encoder(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> str:
    """Which shipped encoder a Hugging Face-layout dict holds, from its shapes (meta tensors work)."""
    if CLASS_KEY not in sd:
        raise CheckpointError(f"{source}: {CLASS_KEY} missing; cannot tell the encoder (keys: {_few(sd.keys())})")
    width, layers = int(sd[CLASS_KEY].shape[-1]), _layer_count(sd)
    known = {}
    for name in SHIPPED_CONFIGS:
        cfg = shipped_config(name)
        known[name] = (cfg.hidden_size, cfg.num_hidden_layers)
        if (width, layers) == known[name]:
            return name
    expected = "; ".join(f"{n}: width {w}, {n_l} layers" for n, (w, n_l) in known.items())
    raise CheckpointError(
        f"{source}: CLIP image encoder of width {width} with {layers} layers matches no shipped encoder "
        f"({expected}); pass config= for other encoders")


# ---------------------------------------------------------------- building and loading


def _build_empty(config: Any) -> torch.nn.Module:
    """CLIPVisionModelWithProjection on the meta device (no storage, no random init): `_fill`
    gives each tensor its fp32 CPU storage."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        return CLIPVisionModelWithProjection(config)


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming missing / unexpected keys and shape mismatches, a few of each."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != POSITION_IDS}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
             for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {'; '.join(wrong[:5])}")
    if problems:
        cfg = getattr(model, "config", None)
        arch = (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, projection {cfg.projection_dim}"
                if cfg is not None else "?")
        raise CheckpointError(f"{source}: weights do not fit the CLIP vision model ({arch}): " + "; ".join(problems))


def _fill(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Give every parameter and buffer of the meta-device model fp32 CPU storage from `sd`, popping
    each file tensor as it goes (the file's fp16 copy shrinks while the model grows: peak = the fp32
    model, not both), and rebuild position_ids."""
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            for attr, param in list(module.named_parameters(recurse=False)):
                module._parameters[attr] = torch.nn.Parameter(_fp32(sd.pop(prefix + attr)), requires_grad=False)
            for attr, buf in list(module.named_buffers(recurse=False)):
                key = prefix + attr
                if attr == "position_ids":
                    module._buffers[attr] = torch.arange(buf.shape[-1]).expand(buf.shape).contiguous()  # (1, S): 0..S-1
                elif key in sd:
                    module._buffers[attr] = _fp32(sd.pop(key))
                else:
                    raise CheckpointError(
                        f"{source}: buffer {key} is neither in the file nor rebuilt here "
                        "(unsupported transformers version?)")
    sd.pop(POSITION_IDS, None)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 CPU tensor of its own (a fp32 file tensor is kept, not copied)."""
    return t.to(device="cpu", dtype=torch.float32).contiguous()


def _folder_files(path: str, config: Any) -> Tuple[str, Any]:
    """(weights file, config or None) of a Hugging Face model folder."""
    names = set(os.listdir(path))
    weights = next((os.path.join(path, n) for n in FOLDER_WEIGHTS if n in names), None)
    if weights is None:
        raise CheckpointError(
            f"{path}: expected a Hugging Face folder with {' or '.join(FOLDER_WEIGHTS[:3])}; "
            f"found {_few(names) if names else 'nothing'}")
    if config is None and "config.json" in names:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = config_from_dict(json.load(f))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}/config.json: unreadable ({type(e).__name__}: {e})")
    return weights, config


def load_clip_vision(path: PathLike, config: Any = None) -> torch.nn.Module:
    """CLIPVisionModelWithProjection (eval, fp32, CPU) from a Hugging Face folder or a single file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: CLIP image encoder not found (expected a folder or a .safetensors/.bin/.pth file)")
    config = _as_config(config) if config is not None else None
    weights = path
    if os.path.isdir(path):
        weights, config = _folder_files(path, config)
    sd = normalize_state_dict(_unwrap(read_weights(weights), weights), weights)
    if config is None:
        config = shipped_config(detect_encoder(sd, weights))
    model = _build_empty(config)
    check_state_dict(model, sd, weights)
    _fill(model, sd, weights)
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------- images


_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # Pillow >= 9.1 moved the constants


def preprocess_images(images: Sequence[Image.Image], size: int = 224,
                      pad_color: Tuple[int, int, int] = (127, 127, 127)) -> torch.Tensor:
    """(B, 3, size, size) float32 CLIP input: RGB, pad to square, bicubic resize, CLIP mean/std."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ImageInputError("preprocess_images: expected at least one image, got none")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)  # (3,) -> (3, 1, 1): per channel
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)  # (3,) -> (3, 1, 1)
    out = []
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ImageInputError(f"preprocess_images: image {i} is a {type(img).__name__}, expected a PIL.Image")
        if img.width < 1 or img.height < 1:
            raise ImageInputError(f"preprocess_images: image {i} is empty ({img.width}x{img.height})")
        square = pad_to_square(img, pad_color)
        square = square.resize((size, size), _BICUBIC)  # Pillow widens the kernel when shrinking: antialiased
        arr = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0)  # (size, size, 3)
        out.append((arr.permute(2, 0, 1) - mean) / std)  # (size, size, 3) -> (3, size, size)
    return torch.stack(out)  # (B, 3, size, size)


# ---------------------------------------------------------------- encoding


def _device_dtype(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where the model's weights live."""
    p = next(model.parameters())
    return p.device, p.dtype


def encode_images(model: torch.nn.Module, pixel_values: torch.Tensor, plus: bool) -> torch.Tensor:
    """image_embeds (B, E) for base adapters; penultimate hidden states (B, S, W) for Plus."""
    device, dtype = _device_dtype(model)
    with torch.no_grad():
        out = model(pixel_values=pixel_values.to(device=device, dtype=dtype), output_hidden_states=plus)
    return out.hidden_states[-2] if plus else out.image_embeds


def negative_features(model: torch.nn.Module, plus: bool, like: torch.Tensor) -> torch.Tensor:
    """Uncond features: zeros (base) or the encoding of an all-zero pixel tensor (Plus)."""
    if not plus:
        return torch.zeros_like(like)
    size = int(model.config.image_size)
    channels = int(getattr(model.config, "num_channels", 3))
    zeros = torch.zeros(like.shape[0], channels, size, size)  # zero after normalisation, as IP-Adapter does
    neg = encode_images(model, zeros, plus=True)
    if neg.shape != like.shape:
        raise CheckpointError(
            f"negative_features: encoder gives {tuple(neg.shape)} but the features are {tuple(like.shape)}; "
            "were they made by another encoder?")
    return neg.to(device=like.device, dtype=like.dtype)
