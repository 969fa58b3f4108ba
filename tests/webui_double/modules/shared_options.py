"""Built-in settings that generation reads; mirrors modules/shared_options.py (a subset, same keys and defaults)."""
from modules.options import OptionInfo, options_section

restricted_opts = set()  # mirrors modules/shared_options.py (restricted_opts)

options_templates = {}  # mirrors modules/shared_options.py (options_templates)

options_templates.update(options_section(('sd', "Stable Diffusion", "sd"), {
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", infotext="Clip skip"),
    "emphasis": OptionInfo("Original", "Emphasis mode", infotext="Emphasis"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
    "enable_quantization": OptionInfo(False, "Enable quantization in K samplers"),
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "hires_fix_refiner_pass": OptionInfo("second pass", "Hires fix: which pass to enable refiner for"),
}))

options_templates.update(options_section(('sampler-params', "Sampler parameters", "sd"), {
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma", infotext='NGMS'),
    "s_min_uncond_all": OptionInfo(False, "Negative Guidance minimum sigma all steps", infotext='NGMS all steps'),
    "s_churn": OptionInfo(0.0, "sigma churn"),
    "s_tmin": OptionInfo(0.0, "sigma tmin"),
    "s_tmax": OptionInfo(0.0, "sigma tmax"),
    "s_noise": OptionInfo(1.0, "sigma noise"),
    "eta_ancestral": OptionInfo(1.0, "Eta for k-diffusion samplers"),
    "img2img_extra_noise": OptionInfo(0.0, "Extra noise multiplier for img2img and hires fix"),
}))

options_templates.update(options_section(('optimizations', "Optimizations", "sd"), {
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt", infotext='Pad conds'),
    "pad_cond_uncond_v0": OptionInfo(False, "Pad prompt/negative prompt (v0)", infotext='Pad conds v0'),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "cache_fp16_weight": OptionInfo(False, "Cache FP16 weight for LoRA"),
}))

options_templates.update(options_section(('compatibility', "Compatibility", "sd"), {
    "use_old_emphasis_implementation": OptionInfo(False, "Use old emphasis implementation."),
    "use_old_scheduling": OptionInfo(False, "Use old prompt editing timelines."),
    "hires_fix_use_firstpass_conds": OptionInfo(False, "For hires fix, calculate conds of second pass using extra networks of first pass."),
}))

options_templates.update(options_section(('img2img', "img2img", "sd"), {
    "initial_noise_multiplier": OptionInfo(1.0, "Noise multiplier for img2img"),
    "img2img_color_correction": OptionInfo(False, "Apply color correction to img2img results to match original colors."),
    "img2img_fix_steps": OptionInfo(False, "With img2img, do exactly the amount of steps the slider specifies."),
    "inpainting_mask_weight": OptionInfo(1.0, "Inpainting conditioning mask strength"),
    "overlay_inpaint": OptionInfo(True, "Overlay original for inpaint"),
}))

options_templates.update(options_section(('saving-images', "Saving images/grids", "saving"), {
    "samples_save": OptionInfo(False, "Always save all generated images"),  # double: False, nothing is written
    "grid_save": OptionInfo(False, "Always save all generated image grids"),  # double: False
    "enable_pnginfo": OptionInfo(True, "Write infotext to metadata of the generated image"),
    "save_mask": OptionInfo(False, "For inpainting, save a copy of the greyscale mask"),
    "return_mask": OptionInfo(False, "For inpainting, include the greyscale mask in results for web"),
}))

options_templates.update(options_section(('ui', "Live previews / gallery", "ui"), {
    "return_grid": OptionInfo(True, "Show grid in gallery"),
    "grid_only_if_multiple": OptionInfo(True, "Do not save grids consisting of one picture"),
    "live_preview_content": OptionInfo("Prompt", "Live preview subject"),
    "live_previews_enable": OptionInfo(False, "Show live previews of the created image"),  # double: False
    "sd_vae_decode_method": OptionInfo("Full", "VAE type for decode", infotext='VAE Decoder'),
    "sd_vae_encode_method": OptionInfo("Full", "VAE type for encode", infotext='VAE Encoder'),
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
    "add_model_name_to_info": OptionInfo(True, "Add model name to infotext"),
    "add_version_to_infotext": OptionInfo(False, "Add program version to infotext"),  # double: False (no git)
    "infotext_skip_pasting": OptionInfo([], "Disregard fields from pasted infotext"),
    "skip_early_cond": OptionInfo(0.0, "Ignore negative prompt during early sampling", infotext="Skip Early CFG"),
}))
