"""Streamlit quality-latency explorer (`ragserve ui`).

Layout: `data` loads and validates result files and computes the trade-off points and
their Pareto frontier (pure); `outcome` turns a query's events into what the views show
(pure); `backend` answers queries on a ragserve server or the in-process controller;
`load` samples engine load over time; `registry` keeps backends and monitors alive across
Streamlit reruns; `charts` builds the plotly figures; `views/` renders one tab each; `app`
wires the sidebar and the tabs.
"""
