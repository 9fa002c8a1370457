"""Getting a model, for every stage: the layer below train, eval, analyze and the report, importing none of them.

- ``factory``: open_clip's model factory with clipgen's model configs registered (tiny CPU models, their compact
  vocabulary in ``vocab``).
- ``supervised``: the supervised baseline (CLIP's visual tower + a 1345-way head) and its head's outputs.
- ``checkpoint``: the epoch checkpoint's payload and reading any checkpoint back.
- ``kinds``: one model kind per ``meta.json["model_kind"]``: how it is built, what its checkpoint holds, its
  evaluation head; ``load_checkpoint`` turns a run's checkpoint into a model.
- ``zeroshot``: CLIP's zero-shot head (templates, class embeddings, logits).
"""
