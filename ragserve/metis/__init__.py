"""METIS (arXiv 2412.10543): per-query RAG plans from a query profile and the engine's free KV.

One module per role; data flows top to bottom, each module imports only those above it:

    profile       QueryProfile (the four dimensions + confidence), the LearnedProfiler protocol
    llm_profiler  the LLM profiler: prompt, parse, async run on any `generate` engine
    learned       the learned profiler at serving time (features, classifiers; trained in
                  ragserve.eval.training)
    rules         profile -> pruned candidate plans (METIS Algorithm 1 as data) + confidence gate
    cost          what a plan costs in KV, calls and time, from the real chunk token counts
    scheduler     picks each waiting query's plan under the free KV (best fit) and admits it
    feedback      the golden-plan feedback loop's bookkeeping and review prompt (§5)
    planner       MetisPlanner: the controller's QueryPlanner, wiring all of the above

Everything but `planner` is synchronous and engine-free; `planner` does the I/O.
"""
