"""Text <-> token ids: a character vocabulary, UTF-8 bytes, GPT-2's BPE (tiktoken) or a byte-level
BPE trained on the data set (Hugging Face tokenizers), as meta.json names it."""
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
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return "".join(self.vocab[i] for i in ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255). Every text shares this vocabulary, so a model pretrained
    on one text fine-tunes on any other and no prompt is out of vocabulary; for ASCII text a byte is
    a character, so losses compare with a character model's."""
    kind = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"token id {bad[0]} is not a byte (0..255)")
        # a multi-byte character cut short shows as U+FFFD
        return bytes(ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    kind = "gpt2"

    def __init__(self):
        import tiktoken  # only the gpt2 data sets need it
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads its files on first use: offline this fails
            raise DataError(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); connect "
                            "to the internet once, or set TIKTOKEN_CACHE_DIR to a folder with its "
                            "cached files") from None
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode_ordinary(text)  # '<|endoftext|>' in user text stays plain text

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])


class BPETokenizer:
    """A byte-level BPE trained on a data set's train split (train_bpe). Its whole definition is the
    tokenizers library's JSON text, kept in meta.json under "bpe": a checkpoint stores meta, so it
    decodes without the data folder. Bytes are its base alphabet, so any text encodes and decoding
    gives the text back exactly."""
    kind = "bpe"

    def __init__(self, json_text):
        from tokenizers import Tokenizer  # only the bpe data sets need it
        self.json = json_text
        try:
            self.tokenizer = Tokenizer.from_str(json_text)
        except Exception as e:  # the library's own parse error, one of several types
            raise DataError(f"meta.json's bpe tokenizer cannot be read ({str(e)[:80]}); "
                            "prepare the data set again") from None
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # the library would drop it silently
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return self.tokenizer.decode(ids)  # a cut multi-byte character shows as U+FFFD


BPE_SIZES = (257, 65535)  # the 256 bytes and one merge at least; ids must fit in uint16


def bpe_size(spec) -> int:
    """N of a --tokenizer=bpe:N spec; a one-line DataError for anything else."""
    low, high = BPE_SIZES
    size = spec.removeprefix("bpe:")
    if not spec.startswith("bpe:") or not size.isdigit() or not low <= int(size) <= high:
        raise DataError(f"tokenizer={spec!r}: a BPE is bpe:N with N from {low} (the 256 bytes and "
                        f"one merge) to {high:,} (ids stored as uint16), e.g. bpe:4096")
    return int(size)


def train_bpe(text, vocab_size) -> BPETokenizer:
    """A byte-level BPE of exactly vocab_size tokens learned from text, split into words by GPT-2's
    pattern; a one-line DataError when the text holds too few different pairs to learn that many."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    if bpe.get_vocab_size() != vocab_size:
        raise DataError(f"the train text ({len(text.encode('utf-8')):,} bytes) has only enough "
                        f"different pairs for {bpe.get_vocab_size()} tokens, not bpe:{vocab_size}; "
                        "use a smaller N or more text")
    return BPETokenizer(bpe.to_str())


TOKENIZERS = ("char", "byte", "gpt2", "bpe")


def make_tokenizer(kind, vocab=None):
    if kind == "char":
        return CharTokenizer(vocab)
    return ByteTokenizer() if kind == "byte" else GPT2Tokenizer()


def tokenizer_from_meta(meta: dict):
    """The tokenizer of a data set's meta.json, or of a checkpoint's copy of it."""
    kind = meta.get("tokenizer")
    if kind not in TOKENIZERS:
        raise DataError(f"meta.json names an unknown tokenizer {kind!r}; prepare the data set "
                        "again")
    if kind == "bpe":
        if not isinstance(meta.get("bpe"), str):
            raise DataError("meta.json names a bpe tokenizer but holds no \"bpe\" definition; "
                            "prepare the data set again")
        return BPETokenizer(meta["bpe"])
    return make_tokenizer(kind, meta.get("vocab"))


def same_tokenizer(meta, other) -> bool:
    """Whether two metas (a data set's, a checkpoint's) of one kind of tokenizer read text into the
    same ids: the same character list, the same BPE."""
    return all(meta.get(k) == other.get(k) for k in ("vocab", "bpe"))
