"""Text <-> token ids: a character vocabulary, UTF-8 bytes or GPT-2's BPE (tiktoken), as
meta.json names it."""
from tinygpt.common import DataError


class CharTokenizer:
    kind = "char"

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.vocab_size = len(self.vocab)
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}

    def encode(self, text):
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            raise ValueError(f"character {ch!r} (U+{ord(ch):04X}) is not in this data set's "
                             f"vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return "".join(self.vocab[i] for i in ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255). Every text shares this vocabulary, so a model pretrained on one
    text fine-tunes on any other and no prompt is out of vocabulary; for ASCII text a byte is a character,
    so losses compare with a character model's."""
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"token id {bad[0]} is not a byte (0..255)")
        return bytes(ids).decode("utf-8", errors="replace")  # a cut multi-byte character shows as U+FFFD


class GPT2Tokenizer:
    kind = "gpt2"

    def __init__(self):
        import tiktoken  # only the gpt2 data sets need it
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads its files on first use: offline this fails
            raise DataError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); connect to the "
                            "internet once, or set TIKTOKEN_CACHE_DIR to a folder with its cached files") from None
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)  # '<|endoftext|>' in user text stays plain text

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])


TOKENIZERS = ("char", "byte", "gpt2")


def make_tokenizer(kind, vocab=None):
    return CharTokenizer(vocab) if kind == "char" else ByteTokenizer() if kind == "byte" else GPT2Tokenizer()


def tokenizer_from_meta(meta: dict):
    kind = meta.get("tokenizer")
    if kind not in TOKENIZERS:
        raise DataError(f"meta.json names an unknown tokenizer {kind!r}; prepare the data set again")
    return make_tokenizer(kind, meta.get("vocab"))
