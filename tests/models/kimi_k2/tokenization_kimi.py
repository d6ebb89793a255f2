"""A stand-in for Kimi-K2's tokenization_kimi.py (remote code, loaded through tokenizer_config.json's auto_map): a
tiktoken BPE read from tiktoken.model, its special tokens after the ranks, tokens shown as GPT-2 byte characters.
Written for slimquant's tests (not Moonshot's file); it imports what Kimi's does, from where transformers 4 had it.
"""

import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
from transformers.tokenization_utils import PreTrainedTokenizer

PAT = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, added_tokens_decoder=None, **kwargs):
        ranks = load_tiktoken_bpe(vocab_file)
        specials = {
            str(t.content if hasattr(t, "content") else t["content"]): int(i)
            for i, t in (added_tokens_decoder or {}).items()
        }
        self.model = tiktoken.Encoding(
            os.path.basename(vocab_file), pat_str=PAT, mergeable_ranks=ranks, special_tokens=specials
        )
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.texts = {i: "".join(self.byte_encoder[b] for b in t) for t, i in ranks.items()}
        self.ids = {t: i for i, t in self.texts.items()}
        super().__init__(added_tokens_decoder=added_tokens_decoder, **kwargs)

    @property
    def vocab_size(self):
        return self.model.n_vocab

    def get_vocab(self):
        return dict(self.ids) | dict(self.added_tokens_encoder)

    def _tokenize(self, text, **kwargs):
        return [self.texts[i] for i in self.model.encode_ordinary(text)]

    def _convert_token_to_id(self, token):
        return self.ids.get(token, self.added_tokens_encoder.get(token, 0))

    def _convert_id_to_token(self, index):
        return self.texts.get(index) or self.added_tokens_decoder[index].content

    def convert_tokens_to_string(self, tokens):
        return bytearray(self.byte_decoder[c] for c in "".join(tokens)).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
