"""A tiny text encoder for the toy world: word tokens, a 2-layer transformer, a 768-wide context.

The context is 768 wide because the IP-Adapter loader recognises SD1.5 adapters by that width
(charadapter.checkpoint.ARCHES); a 64-wide transformer projected to 768 keeps it small.
Used as the LatentDiffusion's cond stage (`encode(list of str)` -> (B, T, 768)).
"""

from typing import List, Optional, Sequence

import torch
from torch import nn

from .data import vocabulary

CONTEXT_LENGTH = 32
CONTEXT_DIM = 768
BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"


class WordTokenizer:
    """Lower-case words and commas -> ids: [BOS] words [EOS] padded with PAD to CONTEXT_LENGTH."""

    def __init__(self, words: Sequence[str] = ()):
        self.words = [BOS, EOS, PAD, UNK] + list(words or vocabulary())
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def words_of(self, text: str) -> List[str]:
        return text.lower().replace(",", " , ").split()

    def encode_words(self, text: str) -> List[int]:
        """Ids of the words alone (no BOS/EOS): what a phrase is matched with."""
        return [self.ids.get(w, self.ids[UNK]) for w in self.words_of(text)]

    def chunk(self, text: str) -> List[int]:
        """The full token row the encoder sees: [BOS] words [EOS] PAD..."""
        ids = [self.ids[BOS]] + self.encode_words(text)[: CONTEXT_LENGTH - 2] + [self.ids[EOS]]
        return ids + [self.ids[PAD]] * (CONTEXT_LENGTH - len(ids))


class ToyTextEncoder(nn.Module):
    """Token + position embeddings, a transformer, projected to the UNet's context.

    `window`: each layer attends only to tokens at most this far away (None: everywhere, what the
    committed weights use). A global view lets any token carry the whole caption, so the UNet
    could do without spatially selective cross-attention; in practice the trained maps localise
    (README "Toy world"), and a local view (window 1), tried on an earlier, shorter training, was
    no better.
    """

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context_dim: int = CONTEXT_DIM,
                 window: Optional[int] = None):
        super().__init__()
        self.window = window
        index = torch.arange(CONTEXT_LENGTH)
        far = (index[:, None] - index[None, :]).abs() > (window if window is not None else CONTEXT_LENGTH)
        self.register_buffer("attn_mask", far, persistent=False)  # (T, T) True = not attended
        self.tokenizer = WordTokenizer()
        self.token_embedding = nn.Embedding(len(self.tokenizer), width)
        self.position_embedding = nn.Parameter(torch.randn(CONTEXT_LENGTH, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, context_dim)

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, T) long."""
        return torch.tensor([self.tokenizer.chunk(t) for t in texts], dtype=torch.long,
                            device=self.token_embedding.weight.device)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokens(texts)
        x = self.token_embedding(ids) + self.position_embedding  # (B, T, W)
        mask = self.attn_mask if self.window is not None else None  # None: the committed weights' path
        return self.proj(self.final_norm(self.transformer(x, mask=mask)))  # (B, T, C_ctx)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self(list(texts))
