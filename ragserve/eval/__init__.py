"""Evaluation and offline tuning.

    datasets   the four datasets: questions, corpus -> collection, filters, scoring
    workload   seeded question samples and Poisson arrival times (pure)
    systems    fixed plans, AdaptiveRAG*, METIS, METIS + CacheBlend as controller planners
    runner     `ragserve eval`: replay a workload against each system, one row per query
    report     summaries, headline comparisons, JSON / markdown / PNG
    tuning     `ragserve tune`: grid sweep -> profiles/<model>/<dataset>/, best plan per query
    training   `ragserve tune train-profiler`: scikit-learn profiler from the tuned labels

The serving path never imports this package (tests/metis/test_imports.py checks it); the
learned profiler it trains is loaded by ragserve.metis.learned.
"""
