"""The KV cache GPT.forward and GPT.decode_step fill: keys and values of the tokens seen so far, per layer."""
import torch


class KVCache:
    """Keys and values, one (B, n_head, max_len, head_dim) tensor per layer (so that a compiled step updates each in
    place), allocated on first write in the keys' dtype; `pos` are filled (GPT.forward advances it). sinks > 0:
    make_room keeps the first `sinks`, shifts the rest left. slot, a (1,) tensor, is where decode_step writes."""

    def __init__(self, n_layer, max_len, sinks=0):
        self.n_layer, self.max_len, self.sinks = n_layer, max_len, sinks
        self.k = self.v = self.slot = None
        self.pos = 0

    def make_room(self, n):
        """Drop the oldest entries after the sinks so that n more tokens fit."""
        drop = self.pos + n - self.max_len
        if self.k is not None and 0 < drop <= self.pos - self.sinks:
            for t in self.k + self.v:
                t[:, :, self.sinks:self.pos - drop] = t[:, :, self.sinks + drop:self.pos].clone()
            self.pos -= drop

    def update(self, layer, k, v):
        """Store k, v (batch, n_head, T, head_dim) at `pos` and return the keys and values so far, or with `slot`
        store one token there and return every slot (attention masks the later ones)."""
        if self.k is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k, self.v = ([torch.zeros(shape, dtype=k.dtype, device=k.device) for _ in range(self.n_layer)]
                              for _ in "kv")
        if self.slot is not None:
            return self.k[layer].index_copy_(2, self.slot, k), self.v[layer].index_copy_(2, self.slot, v)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end], self.v[layer][:, :, self.pos:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
