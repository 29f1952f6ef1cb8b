"""Key maps between checkpoint layouts, written as tables of module-path templates.

A template names a module path with ``#`` for any index (``blocks.#.attn1.to_q``). A key is
renamed by the first template that matches its beginning up to a ``.`` boundary; the rest of the
key (``.weight``, ``.bias``, sub-paths) is kept. The same table serves both directions, so a
round trip is exact by construction and tests exercise both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class KeyMap:
    """Ordered (official, other) template pairs; more specific templates come first."""

    pairs: tuple[tuple[str, str], ...]
    name: str

    @cached_property
    def _compiled(self):
        def compile_side(side: int):
            rules = []
            for pair in self.pairs:
                src, dst = pair[side], pair[1 - side]
                pattern = re.compile("^" + re.escape(src).replace(r"\#", r"(\d+)") + r"(?=\.|$)")
                rules.append((pattern, dst))
            return rules
        return compile_side(0), compile_side(1)

    def _rename(self, key: str, rules) -> str:
        for pattern, dst in rules:
            m = pattern.match(key)
            if m:
                groups = iter(m.groups())
                new = re.sub("#", lambda _: next(groups), dst)
                return new + key[m.end():]
        return key

    def to_official(self, key: str) -> str:
        return self._rename(key, self._compiled[1])

    def from_official(self, key: str) -> str:
        return self._rename(key, self._compiled[0])


# Official Wan DiT <-> diffusers WanTransformer3DModel / WanVACETransformer3DModel.
DIT_DIFFUSERS = KeyMap(name="Wan DiT official <-> diffusers", pairs=(
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("vace_blocks.#.before_proj", "vace_blocks.#.proj_in"),
    ("vace_blocks.#.after_proj", "vace_blocks.#.proj_out"),
    *((f"{group}.#.{official}", f"{group}.#.{diffusers}")
      for group in ("blocks", "vace_blocks")
      for official, diffusers in (
          ("modulation", "scale_shift_table"),
          ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"),
          ("self_attn.v", "attn1.to_v"), ("self_attn.o", "attn1.to_out.0"),
          ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
          ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
          ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"),
          ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
          ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
          ("cross_attn.norm_k_img", "attn2.norm_added_k"),
          # official norm3 (the only block norm with weights) is diffusers' norm2
          ("norm3", "norm2"),
          ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
      )),
))

# Keys diffusers files may hold that carry nothing the network uses.
DIT_DIFFUSERS_IGNORED = re.compile(r"(^|\.)norm_added_q\.")


def strip_common_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str:
    """Returns the first of ``prefixes`` that every key starts with, or ''."""
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""
