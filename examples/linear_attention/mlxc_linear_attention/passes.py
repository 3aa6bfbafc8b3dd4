"""A pass registered by name: `--passes dce,chunk-linear-attention` (or in a pipeline list) runs it."""

from dataclasses import dataclass

from mlxc.plugins import Pass, PassReport, register_pass


@register_pass
@dataclass(frozen=True)
class ChunkLinearAttention(Pass):
    """A prefill of T positions in one block builds a [T, T] score matrix per head; blocks of `size` positions bound
    that to [size, size] and carry the sums between blocks, with the same result. Sets `chunk_size` on every
    linear_attention op that has none."""

    name = "chunk-linear-attention"
    size: int = 64

    def run(self, program):
        changed = 0
        for fn in program.functions:
            for o in fn.ops:
                if o.op == "linear_attention" and o.attrs["chunk_size"] is None:
                    o.attrs["chunk_size"] = self.size
                    changed += 1
        return program, PassReport(self.name, {"chunked": changed})
