"""Prompt -> 77-token chunks -> text conditioning; mirrors modules/sd_hijack_clip.py.

Our own implementation of the same rules. Textual inversion embeddings are not modelled
(the embedding database never finds one).
"""
import math
from collections import namedtuple

import torch

from modules import prompt_parser, devices, sd_emphasis
from modules import shared


class PromptChunk:  # mirrors modules/sd_hijack_clip.py (PromptChunk)
    """77 token ids (BOS + 75 + EOS) with one multiplier each, and textual-inversion fixes."""

    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


PromptChunkFix = namedtuple('PromptChunkFix', ['offset', 'embedding'])  # mirrors modules/sd_hijack_clip.py (PromptChunkFix)


class TextConditionalModel(torch.nn.Module):  # mirrors modules/sd_hijack_clip.py (TextConditionalModel)
    def __init__(self):
        super().__init__()
        from modules import sd_hijack
        self.hijack = sd_hijack.model_hijack
        self.chunk_length = 75
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def empty_chunk(self):  # mirrors (TextConditionalModel.empty_chunk): BOS then 76 EOS
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):  # mirrors (TextConditionalModel.get_target_prompt_token_count)
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize(self, texts):  # mirrors (TextConditionalModel.tokenize)
        raise NotImplementedError

    def encode_with_transformers(self, tokens):  # mirrors (TextConditionalModel.encode_with_transformers)
        raise NotImplementedError

    def tokenize_line(self, line):  # mirrors (TextConditionalModel.tokenize_line)
        """Split one prompt into PromptChunks; returns (chunks, token_count).

        Emphasis runs come from parse_prompt_attention (unless opts.emphasis == "None", which also
        disables BREAK). BREAK closes the current chunk. When a chunk is full and the last comma is
        within opts.comma_padding_backtrack tokens, the tokens after that comma move to the next chunk.
        Each chunk is padded with id_end to 75 and framed as [id_start] + 75 + [id_end].
        token_count is 75 per closed chunk plus the real length of the last one.
        """
        opts = shared.opts
        parsed = prompt_parser.parse_prompt_attention(line) if opts.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])

        chunks = []
        state = {"chunk": PromptChunk(), "count": 0, "comma": -1}

        def close_chunk(is_last=False):
            chunk = state["chunk"]
            state["count"] += len(chunk.tokens) if is_last else self.chunk_length
            missing = self.chunk_length - len(chunk.tokens)
            if missing > 0:
                chunk.tokens += [self.id_end] * missing
                chunk.multipliers += [1.0] * missing
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            chunks.append(chunk)
            state["chunk"] = PromptChunk()
            state["comma"] = -1

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == 'BREAK' and weight == -1:
                close_chunk()
                continue

            position = 0
            while position < len(tokens):
                token = tokens[position]
                chunk = state["chunk"]
                full = len(chunk.tokens) == self.chunk_length
                if token == self.comma_token:
                    state["comma"] = len(chunk.tokens)
                elif (opts.comma_padding_backtrack != 0 and full and state["comma"] != -1
                      and len(chunk.tokens) - state["comma"] <= opts.comma_padding_backtrack):
                    cut = state["comma"] + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    close_chunk()
                    state["chunk"].tokens, state["chunk"].multipliers = moved_tokens, moved_mults

                if len(state["chunk"].tokens) == self.chunk_length:
                    close_chunk()

                embedding, embedding_length_in_tokens = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    state["chunk"].tokens.append(token)
                    state["chunk"].multipliers.append(weight)
                    position += 1
                    continue
                raise NotImplementedError("textual inversion embeddings are not modelled by the double")

        if state["chunk"].tokens or not chunks:
            close_chunk(is_last=True)

        return chunks, state["count"]

    def process_texts(self, texts):  # mirrors (TextConditionalModel.process_texts)
        """tokenize_line for each text (cached per text); returns (chunks per text, max token_count)."""
        token_count = 0
        cache = {}
        batch_chunks = []
        for line in texts:
            if line in cache:
                chunks = cache[line]
            else:
                chunks, current_token_count = self.tokenize_line(line)
                token_count = max(current_token_count, token_count)
                cache[line] = chunks
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts):  # mirrors (TextConditionalModel.forward)
        """Encode chunk i of every text together and concatenate along tokens: (B, 77 * n_chunks, C)."""
        batch_chunks, _ = self.process_texts(texts)
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            tokens = [x.tokens for x in batch_chunk]
            multipliers = [x.multipliers for x in batch_chunk]
            self.hijack.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens(tokens, multipliers))

        if any(x for x in texts if "(" in x or "[" in x) and shared.opts.emphasis != "Original":
            self.hijack.extra_generation_params["Emphasis"] = shared.opts.emphasis

        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):  # mirrors (TextConditionalModel.process_tokens)
        """Encode one chunk per text and apply the emphasis multipliers."""
        tokens = torch.asarray(remade_batch_tokens).to(devices.device)
        if self.id_end != self.id_pad:  # SD2 / SDXL-G pad after the first end token with a different id
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad

        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, 'pooled', None)

        emphasis = sd_emphasis.get_current_option(shared.opts.emphasis)()
        emphasis.tokens = remade_batch_tokens
        emphasis.multipliers = torch.asarray(batch_multipliers).to(devices.device)
        emphasis.z = z
        emphasis.after_transformers()
        z = emphasis.z

        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWordsBase(TextConditionalModel):  # mirrors modules/sd_hijack_clip.py
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack = hijack
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(self.wrapped, 'return_pooled', False)
        self.legacy_ucg_val = None


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):  # mirrors modules/sd_hijack_clip.py
    """Wraps ldm's FrozenCLIPEmbedder (anything with .tokenizer = HF CLIPTokenizer and .transformer = CLIPTextModel)."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.token_mults = {}  # used only by the old emphasis implementation; not filled by the double
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):  # mirrors (FrozenCLIPEmbedderWithCustomWords.tokenize): no BOS/EOS, no truncation
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):  # mirrors (FrozenCLIPEmbedderWithCustomWords.encode_with_transformers)
        clip_skip = shared.opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-clip_skip)
        if clip_skip > 1:
            z = outputs.hidden_states[-clip_skip]
            z = self.wrapped.transformer.text_model.final_layer_norm(z)
        else:
            z = outputs.last_hidden_state
        return z
