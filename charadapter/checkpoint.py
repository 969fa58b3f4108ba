"""IP-Adapter checkpoint loading: one canonical layout plus a spec, whatever the file format.

Formats (h94/IP-Adapter): `.safetensors` with flat keys `image_proj.*` and
`ip_adapter.{2i+1}.to_k_ip.weight` / `.to_v_ip.weight`; `.bin`/`.pt`/`.pth` holding a pickled
`{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}`. Pickles are read only with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

The file key numbers come from IP-Adapter's `ModuleList(unet.attn_processors.values())`: the
processors of every attention in diffusers' registration order (down_blocks, up_blocks,
mid_block), attn1 and attn2 alternating; only attn2 has weights, hence the odd numbers.
Layer i here is file key 2i+1. The variant is read from shapes, never from the file name.
"""

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch

from .errors import CheckpointError
from .projection import ProjectionConfig, infer_projection_config, projection_kind
from .weightfile import read_pickle, read_safetensors

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors",)
# context width -> (arch, attn2 layer count): 16 in SD1.x, 70 in SDXL
ARCHES = {768: ("sd15", 16), 2048: ("sdxl", 70)}
DEFAULT_ENCODER = {"sd15": "ViT-H-14", "sdxl": "ViT-bigG-14"}
# width of image_embeds (projection_dim) -> encoder; feeds the base projection
EMBED_ENCODERS = {1024: "ViT-H-14", 1280: "ViT-bigG-14"}
# width of the penultimate hidden states -> encoder; feeds Plus and Full-Face
HIDDEN_ENCODERS = {1280: "ViT-H-14", 1664: "ViT-bigG-14"}
PROJECTION_SUFFIX = {"linear": "", "resampler": "_plus", "mlp": "_full_face"}
_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class AdapterSpec:
    variant: str  # "sd15", "sd15_vitg", "sd15_plus", "sd15_full_face", "sdxl", "sdxl_vith", "sdxl_vith_plus"
    arch: str  # "sd15" | "sdxl"
    plus: bool  # fed penultimate hidden states (Plus, Full-Face) rather than image_embeds
    num_tokens: int  # image tokens T per image
    context_dim: int  # C: 768 (SD1.5) | 2048 (SDXL)
    clip_dim: int  # width of the features the projection takes: E (embeds) or W (hidden)
    encoder: str  # "ViT-H-14" | "ViT-bigG-14"
    num_layers: int  # attn2 layers: 16 | 70
    projection: str = "linear"  # "linear" | "resampler" | "mlp"
    note: str = ""  # what shapes cannot tell, for the user

    def describe(self) -> str:
        """One line for logs and the UI."""
        feats = "penultimate hidden states" if self.plus else "image embeds"
        text = (f"IP-Adapter {self.variant}: {self.num_tokens} tokens x {self.context_dim}, "
                f"{self.num_layers} layers, {self.encoder} {feats} ({self.clip_dim} wide)")
        return f"{text}; {self.note}" if self.note else text


@dataclass
class IPAdapterWeights:
    spec: AdapterSpec
    image_proj: Dict[str, torch.Tensor]  # keys without the "image_proj." prefix
    layers: List[Tuple[torch.Tensor, torch.Tensor]]  # (to_k_ip.weight, to_v_ip.weight); i <-> "ip_adapter.{2i+1}"
    source: str  # file path, for messages


# ---------------------------------------------------------------- reading files


def read_checkpoint(path: PathLike) -> Tuple[str, Any]:
    """(source, raw content) of a weight file; a folder may hold ip_adapter.{safetensors,bin}."""
    source = os.fspath(path)
    if os.path.isdir(source):  # InvokeAI keeps ip_adapter.bin in a folder
        for name in ("ip_adapter.safetensors", "ip_adapter.bin"):
            if os.path.isfile(os.path.join(source, name)):
                source = os.path.join(source, name)
                break
        else:
            raise CheckpointError(f"{source}: is a folder without ip_adapter.safetensors or ip_adapter.bin")
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: file not found")
    suffix = os.path.splitext(source)[1].lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return source, read_safetensors(source)
    if suffix in PICKLE_SUFFIXES:
        return source, read_pickle(source)
    raise CheckpointError(
        f"{source}: unknown file type {suffix or '(no extension)'!r}; expected "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


# ---------------------------------------------------------------- layout


def describe_foreign(keys: List[str]) -> str:
    """What a state dict without IP-Adapter sections most likely is, with sample keys."""
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("control_model.", "zero_convs.", "input_hint_block."):
        what = "a ControlNet model (ldm layout)"
    elif has("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block."):
        what = "a ControlNet model (diffusers layout)"
    elif has("model.diffusion_model."):
        what = "a Stable Diffusion checkpoint"
    elif has("lora_unet_", "lora_te", ".lora_down.", ".lora_A."):
        what = "a LoRA"
    elif has("vision_model.", "visual.transformer."):
        what = "a CLIP vision encoder"
    else:
        what = "an unrecognised model"
    return f"{what} ({len(keys)} tensors, e.g. {sorted(keys)[:3]})"


def split_sections(raw: Any, source: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(image_proj, ip_adapter) dicts, inner keys without prefixes, from a nested or flat layout."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, found {type(raw).__name__}")
    if isinstance(raw.get("image_proj"), Mapping) and isinstance(raw.get("ip_adapter"), Mapping):
        proj, ip = dict(raw["image_proj"]), dict(raw["ip_adapter"])  # .bin layout
    else:
        proj = {k[len("image_proj."):]: v for k, v in raw.items() if isinstance(k, str) and k.startswith("image_proj.")}
        ip = {k[len("ip_adapter."):]: v for k, v in raw.items() if isinstance(k, str) and k.startswith("ip_adapter.")}
    if not proj or not ip:
        found = describe_foreign([str(k) for k in raw.keys()])
        raise CheckpointError(
            f"{source}: not an IP-Adapter: expected 'image_proj.*' and 'ip_adapter.*' weights, found {found}"
        )
    for section, sd in (("image_proj", proj), ("ip_adapter", ip)):
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                got = f"{v.dtype} tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise CheckpointError(f"{source}: {section}.{k} should be a float tensor, found {got}")
            if not v.is_meta and not bool(torch.isfinite(v).all()):
                raise CheckpointError(
                    f"{source}: {section}.{k} holds NaN or infinite values (a damaged download or a "
                    f"broken fp16 conversion); every image would come out black or noise")
    return proj, ip


def reject_unsupported(proj: Mapping[str, torch.Tensor], ip: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise for IP-Adapter relatives that need inputs other than CLIP image features."""
    lora = sorted(k for k in ip if "_lora." in k)
    if lora or "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.0.weight" in proj):
        found = f"LoRA keys such as ip_adapter.{lora[0]}" if lora else f"image_proj keys {sorted(proj)[:4]}"
        raise CheckpointError(
            f"{source}: an IP-Adapter FaceID model (found {found}); FaceID needs InsightFace face "
            f"embeddings and is not supported: use ip-adapter(-plus)(-face) models"
        )
    if "proj_in.weight" in proj and proj["proj_in.weight"].shape[-1] == 512:
        raise CheckpointError(
            f"{source}: projection input is 512 wide (image_proj.proj_in.weight "
            f"{list(proj['proj_in.weight'].shape)}): an InstantID-style adapter fed InsightFace "
            f"embeddings, not CLIP; not supported"
        )


def parse_layers(ip: Mapping[str, torch.Tensor], source: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(to_k_ip, to_v_ip) pairs ordered by key number, which must run 1, 3, 5, ... with no gaps."""
    numbers: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in ip.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            raise CheckpointError(
                f"{source}: unexpected key ip_adapter.{key}; expected only "
                f"ip_adapter.<n>.to_k_ip.weight / .to_v_ip.weight"
            )
        numbers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    want = list(range(1, 2 * len(numbers), 2))
    if sorted(numbers) != want:
        got = sorted(numbers)
        raise CheckpointError(
            f"{source}: ip_adapter layer numbers should be 1, 3, 5, ..., {want[-1]}; "
            f"missing {sorted(set(want) - set(got))[:8]}, unexpected {sorted(set(got) - set(want))[:8]}"
        )
    layers = []
    for n in want:
        pair = numbers[n]
        for name in ("to_k_ip", "to_v_ip"):
            if name not in pair:
                raise CheckpointError(f"{source}: ip_adapter.{n}.{name}.weight is missing")
        k, v = pair["to_k_ip"], pair["to_v_ip"]
        if k.ndim != 2 or k.shape != v.shape:
            raise CheckpointError(
                f"{source}: ip_adapter.{n}: to_k_ip {list(k.shape)} and to_v_ip {list(v.shape)} "
                f"should be equal 2-D [width, context] matrices"
            )
        layers.append((k, v))
    return layers


def _arch(layers: List[Tuple[torch.Tensor, torch.Tensor]], source: str) -> Tuple[str, int]:
    """(arch, context width) from the layers' input widths and count."""
    context = int(layers[0][0].shape[1])
    odd = [f"ip_adapter.{2 * i + 1} {list(k.shape)}" for i, (k, _) in enumerate(layers) if k.shape[1] != context]
    if odd:
        raise CheckpointError(
            f"{source}: all to_k_ip/to_v_ip should read the same context width {context} "
            f"(from ip_adapter.1), but {odd[:4]} differ"
        )
    if context not in ARCHES:
        raise CheckpointError(
            f"{source}: context width {context} matches no supported base model "
            f"(768 = SD1.5, 2048 = SDXL; SD2.x adapters are not supported)"
        )
    arch, count = ARCHES[context]
    if len(layers) != count:
        raise CheckpointError(
            f"{source}: a {arch} IP-Adapter (context {context}) has {count} attention layers, "
            f"this file has {len(layers)} (ip_adapter.1 .. ip_adapter.{2 * len(layers) - 1})"
        )
    return arch, context


def _encoder(cfg: ProjectionConfig, source: str) -> str:
    """CLIP vision encoder implied by the projection's input width."""
    table, what = (EMBED_ENCODERS, "image_embeds") if cfg.kind == "linear" else (HIDDEN_ENCODERS, "hidden states")
    if cfg.in_dim not in table:
        known = ", ".join(f"{w} = {name}" for w, name in table.items())
        raise CheckpointError(
            f"{source}: the {cfg.kind} projection takes {what} {cfg.in_dim} wide, which matches no "
            f"supported CLIP vision encoder ({known})"
        )
    return table[cfg.in_dim]


def detect_spec(proj: Mapping[str, torch.Tensor], layers: List[Tuple[torch.Tensor, torch.Tensor]],
                source: str) -> AdapterSpec:
    """The spec of a checkpoint, from its shapes."""
    arch, context = _arch(layers, source)
    cfg = infer_projection_config(proj, source, context)
    if cfg.out_dim != context:
        raise CheckpointError(
            f"{source}: the image projection outputs {cfg.out_dim}-wide tokens but the attention "
            f"layers read context width {context} (ip_adapter.1.to_k_ip.weight {list(layers[0][0].shape)})"
        )
    encoder = _encoder(cfg, source)
    variant = arch
    if encoder != DEFAULT_ENCODER[arch]:
        variant += "_vith" if encoder == "ViT-H-14" else "_vitg"
    variant += PROJECTION_SUFFIX[cfg.kind]
    note = ""
    if cfg.kind == "resampler":
        note = "Plus, Plus-Face and Plus-Composition files have identical shapes; this one may be any of them"
    elif cfg.kind == "mlp":
        note = f"Full-Face: one token per encoder position ({cfg.num_tokens} for ViT-H/14 at 224 px)"
    return AdapterSpec(
        variant=variant, arch=arch, plus=cfg.kind != "linear", num_tokens=cfg.num_tokens,
        context_dim=context, clip_dim=cfg.in_dim, encoder=encoder, num_layers=len(layers),
        projection=cfg.kind, note=note,
    )


def load_ip_adapter(path: PathLike) -> IPAdapterWeights:
    """Load an IP-Adapter file (.safetensors, .bin, .pt, .pth), validate it and read its spec."""
    source, raw = read_checkpoint(path)
    return weights_from_state_dict(raw, source)


def weights_from_state_dict(raw: Any, source: str) -> IPAdapterWeights:
    """Validate an already loaded state dict (nested or flat layout) and read its spec."""
    proj, ip = split_sections(raw, source)
    reject_unsupported(proj, ip, source)
    if not projection_kind(proj):
        raise CheckpointError(
            f"{source}: image_proj matches no known IP-Adapter projection "
            f"(expected proj.weight, latents or proj.3.weight), found {sorted(proj)[:6]}"
        )
    layers = parse_layers(ip, source)
    spec = detect_spec(proj, layers, source)
    return IPAdapterWeights(spec=spec, image_proj=proj, layers=layers, source=source)
