"""Model diffing of two trained runs (protocol §8): testable hypotheses about how run B behaves differently from run A.

    records.py     per-image behaviour records of two runs (aligned eval outputs + exposure from the manifests)
    split.py       stable, stratified discovery / verification split
    predicates.py  the hypothesis language (slice x behaviour x direction) and its English rendering
    verify.py      the deterministic verifier (N/A | A | B per image) and the paper's metrics per hypothesis
    dedup.py       near-duplicate hypotheses merged (same image set, or nested sets that restate each other)
    null.py        the seed-null control: each hypothesis re-judged on its own images with A and a null seed
    generators/    slice_diff (exact McNemar + Benjamini-Hochberg), cluster (HDBSCAN over discordant images),
                   sae (latents of a crosscoder over both runs' embeddings that fire where one run wins)
    crosscoder.py  the SAE generator's dictionary: one sparse code over both runs' embeddings, a decoder per run
    concepts.py    a concept vocabulary embedded by each run's text tower, to name the SAE generator's latents
    scores.py      interestingness and abstraction (1-5) by explicit rules
    ranking.py     which accepted hypotheses come first (a diff's top list, one generator's top list)
    llm.py         optional paraphraser / autorater (off by default; localhost endpoint or a local GGUF file)
    summary.py     summary.md, hypotheses.jsonl, metrics.json, plots
    report.py      the study report's HTML section
    run.py         ``run_diff(cfg)``, the entry point of ``clipgen-diff``
    compare.py     the methods comparison over a study's seeds (``clipgen-diff diff=design_contrasts``)
    comparison.py  its statistics and tables (per generator over seeds, paired generator differences, recall)
    synthetic.py   synthetic run directories with planted differences (tests, benchmark)
"""
