"""Tiny but real Stable Diffusion 1.x models from the WebUI's own `ldm` package, built on the CPU.

`make_tiny_sd(seed)` returns an `ldm.models.diffusion.ddpm.LatentDiffusion` instantiated the way
the WebUI does it (`instantiate_from_config` on a config shaped like SD1's v1-inference.yaml),
with three real parts at tiny widths:

- first stage: `ldm.models.autoencoder.AutoencoderKL`, 4 latent channels, 4 levels, so the
  latent is 1/8 of the image side like SD (64x64 pixels -> 8x8 latents, LATENT_FACTOR);
- UNet: `ldm.modules.diffusionmodules.openaimodel.UNetModel` with SD1.5's structure (channel_mult
  (1,2,4,4), 2 res blocks, attention at (4,2,1), depth 1, 8 heads, conv proj_in/proj_out,
  legacy False, use_checkpoint as in SD's config) and model_channels 32;
- cond stage: `ldm.modules.encoders.modules.FrozenCLIPEmbedder` run through its own __init__:
  its `version` argument is a local folder (written once per process) holding a 2-layer,
  32-wide CLIPTextModel and a real CLIP BPE tokenizer derived offline from the vocabulary that
  open-clip-torch ships, so token ids equal SD's (a -> 320, <|endoftext|> -> 49407).

Nothing is downloaded. Importing `ldm.models.diffusion.ddpm` needs pytorch_lightning (real
package, see requirements) and two modules that cannot be installed beside the CPU torch here:
torchvision (ddpm uses only `make_grid`, for training-time image logs) and open_clip (used only
by SD2's FrozenOpenCLIPEmbedder). While ldm imports, and only then, empty placeholders stand in
for whichever of them is missing; they are removed from sys.modules afterwards.

`save_tiny_sd_checkpoint` / `load_tiny_sd_checkpoint` write and read WebUI-style checkpoints with
SD1's key names ("model.diffusion_model.*", "first_stage_model.*",
"cond_stage_model.transformer.text_model.*", schedule buffers such as "alphas_cumprod"),
whichever transformers version built the text encoder.
"""

import atexit
import contextlib
import gzip
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
import warnings
from typing import Dict, List, Optional, Tuple

import torch

TINY_CONTEXT_DIM = 32  # text encoder width == UNet context_dim (SD1.5: 768)
LATENT_FACTOR = 8  # image side / latent side, as in SD
LATENT_CHANNELS = 4
SCALE_FACTOR = 0.18215  # SD1's latent scale (v1-inference.yaml)
TINY_IMAGE_SIZE = 64  # pixel side the tests use; any multiple of LATENT_FACTOR works
MAX_LENGTH = 77  # CLIP context, tokens per chunk including start and end
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>, also SD1's padding token

UNET_MODEL_CHANNELS = 32  # GroupNorm32 uses 32 groups: widths must be multiples of 32
VAE_CHANNELS = 32


# --------------------------------------------------------------------------------------------
# importing ldm


def _fix_pytorch_lightning() -> None:
    """Alias the module ldm imports rank_zero_only from when pytorch_lightning >= 2 lacks it."""
    # mirrors modules/initialize_util.py (fix_pytorch_lightning) of WebUI v1.10.1
    try:
        importlib.import_module("pytorch_lightning.utilities.distributed")
    except ImportError:
        import pytorch_lightning.utilities.rank_zero as rank_zero

        sys.modules["pytorch_lightning.utilities.distributed"] = rank_zero


def _make_grid_unavailable(*args, **kwargs):
    """Stand-in for torchvision.utils.make_grid, which ddpm only calls for training logs."""
    raise RuntimeError("torchvision is not installed; ldm's training-time image logging is unavailable")


def _placeholders() -> Dict[str, types.ModuleType]:
    """Empty modules for the import-time-only dependencies of ldm that are not importable."""
    found: Dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        utils = types.ModuleType("torchvision.utils")
        utils.make_grid = _make_grid_unavailable
        torchvision.utils = utils
        found.update({"torchvision": torchvision, "torchvision.utils": utils})
    before = set(sys.modules)
    try:
        importlib.import_module("open_clip")
    except ImportError:  # installed for its BPE file, but needs torchvision and timm to import
        for name in set(sys.modules) - before:  # submodules the failed import left behind
            if name.startswith("open_clip."):
                del sys.modules[name]
        found["open_clip"] = types.ModuleType("open_clip")
    return found


@contextlib.contextmanager
def _temporary_modules(modules: Dict[str, types.ModuleType]):
    """Put `modules` into sys.modules for the duration, then remove exactly those objects."""
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_ldm() -> types.SimpleNamespace:
    """Import the ldm modules a LatentDiffusion needs; returns them as attributes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
        try:
            import pytorch_lightning  # noqa: F401  (LatentDiffusion is a LightningModule)
        except ImportError as exc:
            raise ImportError(
                "tests/tiny_sd.py needs pytorch_lightning (the WebUI pins 1.9.4): install "
                f"requirements-nodeps.txt with --no-deps; import failed with: {exc}") from exc
        _fix_pytorch_lightning()
        # transformers and torchmetrics read torchvision's availability when first imported:
        # import them before any placeholder exists
        import transformers  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

        # pytorch_lightning's import puts a "default" filter for its deprecations in front
        warnings.filterwarnings("ignore", message=".*rank_zero_only.*has been deprecated.*")
        with _temporary_modules(_placeholders()):
            ddpm = importlib.import_module("ldm.models.diffusion.ddpm")
            autoencoder = importlib.import_module("ldm.models.autoencoder")
            encoders = importlib.import_module("ldm.modules.encoders.modules")
            openaimodel = importlib.import_module("ldm.modules.diffusionmodules.openaimodel")
            ldm_util = importlib.import_module("ldm.util")
    return types.SimpleNamespace(ddpm=ddpm, autoencoder=autoencoder, encoders=encoders,
                                 openaimodel=openaimodel, util=ldm_util)


LDM = import_ldm()
LatentDiffusion = LDM.ddpm.LatentDiffusion
AutoencoderKL = LDM.autoencoder.AutoencoderKL
FrozenCLIPEmbedder = LDM.encoders.FrozenCLIPEmbedder
UNetModel = LDM.openaimodel.UNetModel


# --------------------------------------------------------------------------------------------
# the CLIP tokenizer, built offline


def clip_bpe_path() -> str:
    """Path of the CLIP BPE merges file that open-clip-torch ships (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "expected open-clip-torch to be installed (requirements-nodeps.txt) for "
            "bpe_simple_vocab_16e6.txt.gz; found no 'open_clip' package")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the CLIP BPE file at {path}; it is missing")
    return path


def _bytes_to_unicode() -> List[str]:
    """CLIP's byte -> printable character table, in vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_and_merges(bpe_path: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """CLIP's 49408-token vocabulary (index == id) and its 48894 merge rules."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the same slice OpenAI's and open_clip's tokenizers take
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"expected {CLIP_VOCAB_SIZE} CLIP tokens from {bpe_path}, built {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer_files(directory: str) -> None:
    """Write vocab.json, merges.txt and configs of SD1's tokenizer (openai/clip-vit-large-patch14)."""
    vocab, merges = clip_vocab_and_merges()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = dict(special, model_max_length=MAX_LENGTH, do_lower_case=True, errors="replace",
                  add_prefix_space=False, tokenizer_class="CLIPTokenizer")
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=1)


def tiny_clip_text_config():
    """A 2-layer, 32-wide CLIP text config with SD1's vocabulary, context and activation."""
    from transformers import CLIPTextConfig

    # bos/eos/pad ids 0/2/1 as in openai/clip-vit-large-patch14's config (pooling picks argmax id)
    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=TINY_CONTEXT_DIM,
                          intermediate_size=4 * TINY_CONTEXT_DIM, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
                          hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


_CACHE: Dict[str, str] = {}


def _cache_root() -> str:
    """A per-process temporary folder, removed at exit."""
    if "root" not in _CACHE:
        root = tempfile.mkdtemp(prefix="tiny_sd_")
        atexit.register(shutil.rmtree, root, True)
        _CACHE["root"] = root
    return _CACHE["root"]


def tame_final_layer_norm(model: torch.nn.Module, seed: int) -> None:
    """Give the text encoder's last LayerNorm a trained-looking affine part (bias mean 0.5).

    A fresh LayerNorm (weight 1, bias 0) makes every token vector average exactly 0 over its
    channels, so z.mean() is rounding noise (~1e-8) and the WebUI's "Original" emphasis,
    z * (mean / mean'), divides noise by noise: NaN or wild scales, depending on the low bits a
    library version happens to produce. Trained CLIP encoders have a clearly non-zero mean.
    """
    norm = model.get_submodule("text_model.final_layer_norm" if hasattr(model, "text_model") else "final_layer_norm")
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(0.5 + 0.1 * torch.randn(norm.bias.shape, generator=gen))


def tiny_clip_dir(seed: int = 0) -> str:
    """A local folder FrozenCLIPEmbedder(version=...) loads: tokenizer files + a seeded tiny CLIP."""
    from transformers import CLIPTextModel

    key = f"clip-{seed}"
    if key not in _CACHE:
        directory = os.path.join(_cache_root(), key)
        write_clip_tokenizer_files(directory)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModel(tiny_clip_text_config())
        tame_final_layer_norm(model, seed)
        model.save_pretrained(directory)
        _CACHE[key] = directory
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# the model


def tiny_sd_config(seed: int = 0, use_checkpoint: bool = True):
    """The OmegaConf `model` section of SD1's v1-inference.yaml at tiny widths."""
    from omegaconf import OmegaConf

    unet = dict(
        image_size=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        model_channels=UNET_MODEL_CHANNELS, attention_resolutions=[4, 2, 1], num_res_blocks=2,
        channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=TINY_CONTEXT_DIM, use_checkpoint=use_checkpoint,
        legacy=False, use_linear_in_transformer=False,
    )
    first_stage = dict(
        embed_dim=LATENT_CHANNELS, monitor="val/rec_loss",
        ddconfig=dict(double_z=True, z_channels=LATENT_CHANNELS, resolution=TINY_IMAGE_SIZE,
                      in_channels=3, out_ch=3, ch=VAE_CHANNELS, ch_mult=[1, 2, 4, 4],
                      num_res_blocks=2, attn_resolutions=[], dropout=0.0),
        lossconfig=dict(target="torch.nn.Identity"),
    )
    cond_stage = dict(version=tiny_clip_dir(seed), device="cpu", max_length=MAX_LENGTH)
    model = dict(
        target="ldm.models.diffusion.ddpm.LatentDiffusion",
        params=dict(
            linear_start=0.00085, linear_end=0.0120, num_timesteps_cond=1, log_every_t=200,
            timesteps=1000, first_stage_key="jpg", cond_stage_key="txt", image_size=32,
            channels=LATENT_CHANNELS, cond_stage_trainable=False, conditioning_key="crossattn",
            monitor="val/loss_simple_ema", scale_factor=SCALE_FACTOR, use_ema=False,
            unet_config=dict(target="ldm.modules.diffusionmodules.openaimodel.UNetModel", params=unet),
            first_stage_config=dict(target="ldm.models.autoencoder.AutoencoderKL", params=first_stage),
            cond_stage_config=dict(target="ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                   params=cond_stage),
        ),
    )
    return OmegaConf.create(model)


def _fill_zero_initialised(module: torch.nn.Module, seed: int) -> None:
    """Give random values to the weights ldm zero-initialises, so every path carries signal."""
    # ldm zeroes each ResBlock's last conv, each SpatialTransformer's proj_out and the UNet's
    # output conv: a fresh UNet would ignore its attention and predict zeros
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2 and not p.any():
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def make_tiny_sd(seed: int = 0, use_checkpoint: bool = True) -> "LatentDiffusion":
    """A tiny SD1-shaped LatentDiffusion (fp32, eval, CPU) whose weights depend only on `seed`."""
    config = tiny_sd_config(seed, use_checkpoint=use_checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
            model = LDM.util.instantiate_from_config(config)
    _fill_zero_initialised(model.model.diffusion_model, seed)
    return model.eval()


# --------------------------------------------------------------------------------------------
# WebUI-style checkpoints


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
_TEXT = "cond_stage_model.transformer."
_SD1_TEXT = "cond_stage_model.transformer.text_model."
_POSITION_IDS = _SD1_TEXT + "embeddings.position_ids"  # in SD1 files; newer CLIP modules drop it


def _has_text_model(model: "LatentDiffusion") -> bool:
    """Whether the CLIPTextModel nests its layers under .text_model (transformers 4) or not (5)."""
    return hasattr(model.cond_stage_model.transformer, "text_model")


def tiny_sd_state_dict(model: Optional["LatentDiffusion"] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """`model`'s tensors under SD1 checkpoint key names (UNet, VAE, text encoder, schedule)."""
    model = model if model is not None else make_tiny_sd(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(_TEXT) and not key.startswith(_SD1_TEXT):
            key = _SD1_TEXT + key[len(_TEXT):]  # transformers 5's CLIPTextModel has no .text_model
        state[key] = value.detach().cpu().contiguous().clone()
    state.setdefault(_POSITION_IDS, torch.arange(MAX_LENGTH).unsqueeze(0))  # shape (1, T)
    return state


def save_tiny_sd_checkpoint(model: "LatentDiffusion", path: str) -> str:
    """Write `model` as a .safetensors (flat keys) or .ckpt ({"state_dict": ...}) checkpoint."""
    state = tiny_sd_state_dict(model)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": "pt"})
    elif path.endswith(".ckpt"):
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"expected a checkpoint path ending in .safetensors or .ckpt, got {path}")
    return path


def read_tiny_sd_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The flat state dict of a .safetensors or .ckpt checkpoint."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint.get("state_dict", checkpoint)


def load_tiny_sd_checkpoint(path: str, use_checkpoint: bool = True) -> "LatentDiffusion":
    """Build the tiny architecture and load a checkpoint written by save_tiny_sd_checkpoint."""
    model = make_tiny_sd(0, use_checkpoint=use_checkpoint)
    state = read_tiny_sd_checkpoint(path)
    state.pop(_POSITION_IDS, None)
    if not _has_text_model(model):
        state = {(_TEXT + k[len(_SD1_TEXT):] if k.startswith(_SD1_TEXT) else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("embeddings.position_ids")]  # transformers 4.30
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the tiny SD architecture: "
                         f"{len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    return model.eval()
