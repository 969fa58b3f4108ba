"""Model hijack; mirrors modules/sd_hijack.py (only the text-encoder wrapping and bookkeeping).

The real hijack also swaps CrossAttention.forward for the chosen optimisation, wraps token
embeddings for textual inversion, and handles SD2 / SDXL / XLM-R encoders. The double wraps an
SD1 FrozenCLIPEmbedder only; attention stays ldm's own forward.
"""
from modules import sd_hijack_clip


class _EmbeddingDatabase:  # mirrors modules/textual_inversion/textual_inversion.py (EmbeddingDatabase): always empty
    def find_embedding_at_position(self, tokens, offset):
        return None, None

    def load_textual_inversion_embeddings(self, force_reload=False):
        pass


class StableDiffusionModelHijack:  # mirrors modules/sd_hijack.py (StableDiffusionModelHijack)
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = _EmbeddingDatabase()

    def hijack(self, m):  # mirrors (StableDiffusionModelHijack.hijack): m.cond_stage_model becomes the custom-words wrapper
        conditioner = getattr(m, 'conditioner', None)
        if conditioner is not None:
            raise NotImplementedError("the double does not hijack SDXL conditioners")
        wrapped = m.cond_stage_model
        if not isinstance(wrapped, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(wrapped, self)
        self.clip = m.cond_stage_model

    def undo_hijack(self, m):  # mirrors (StableDiffusionModelHijack.undo_hijack)
        if isinstance(m.cond_stage_model, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
            m.cond_stage_model = m.cond_stage_model.wrapped
        self.clip = None

    def apply_circular(self, enable):  # mirrors (StableDiffusionModelHijack.apply_circular); tiling not modelled
        self.circular_enabled = enable

    def clear_comments(self):  # mirrors (StableDiffusionModelHijack.clear_comments)
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text):  # mirrors (StableDiffusionModelHijack.get_prompt_lengths)
        if self.clip is None:
            return "-", "-"
        _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)


model_hijack = StableDiffusionModelHijack()  # mirrors modules/sd_hijack.py (model_hijack)
