"""Evaluation and offline tuning (issue 7).

    datasets   the four datasets: questions, corpus -> collection, filters, scoring
    workload   seeded question samples and Poisson arrival times (pure)
    systems    fixed plans, AdaptiveRAG*, METIS, METIS + CacheBlend as controller planners
    runner     `ragserve eval`: replay a workload against each system, one row per query
    report     summaries, headline comparisons, JSON / markdown / PNG
    tuning     `ragserve tune`: grid sweep -> profiles/<model>/<dataset>/, best plan per query
    learned    `ragserve tune train-profiler`: scikit-learn profiler from the tuned labels

Nothing here is imported by the serving path, except `learned` when
`metis.learned_profiler` is set.
"""
